"""cpu_conv: the same convolution and gradients as XLA's, only computed another way on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dmjax.models import cpu_conv


def _grads(conv_fn, kernel, dilation, strides, x, variables):
  conv = nn.Conv(6, (kernel, kernel), strides=strides, padding="SAME", kernel_dilation=dilation,
                 use_bias=False, conv_general_dilated=conv_fn)
  loss = lambda v, x: jnp.sum(jnp.sin(conv.apply(v, x)))
  return conv.apply(variables, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)


@pytest.mark.parametrize("kernel,dilation,strides", [(3, 1, 1), (3, 2, 1), (1, 1, 1), (3, 1, 2)])
def test_outputs_and_gradients_match_xla(kernel, dilation, strides):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 5))
  variables = nn.Conv(6, (kernel, kernel), use_bias=False).init(jax.random.PRNGKey(1), x)
  grads = functools.partial(_grads, kernel=kernel, dilation=dilation, strides=strides, x=x,
                            variables=variables)
  (out, (kernel_grad, input_grad)) = grads(cpu_conv.conv_general_dilated)
  (ref_out, (ref_kernel_grad, ref_input_grad)) = grads(jax.lax.conv_general_dilated)
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_allclose(input_grad, ref_input_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kernel_grad["params"]["kernel"], ref_kernel_grad["params"]["kernel"],
                             rtol=1e-5, atol=1e-5)


def test_kernel_grad_by_taps_is_the_correlation_of_input_and_output_gradient():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 4, 1)).astype(np.float32)
  dy = rng.standard_normal((1, 4, 4, 1)).astype(np.float32)
  grad = cpu_conv.kernel_grad_by_taps(x, dy, (3, 3, 1, 1), ((1, 1), (1, 1)), (1, 1))
  padded = np.pad(x[0, :, :, 0], 1)
  expected = [[np.sum(padded[i:i + 4, j:j + 4] * dy[0, :, :, 0]) for j in range(3)]
              for i in range(3)]
  np.testing.assert_allclose(grad[:, :, 0, 0], expected, rtol=1e-5)
