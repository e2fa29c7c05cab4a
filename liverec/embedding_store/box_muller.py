"""Normal pairs from pairs of 24-bit uniforms (Box-Muller), in float32 +, -, *, / and sqrt only.

Why not torch.log / cos / sin: every math library rounds the last bit its own way (torch's
vectorised CPU functions, CUDA's, the C library numba calls), so a new row's initial weights
could differ by an ulp between CPU and CUDA, and the compiled CPU kernel had to hand the
transcendental part back to torch (five passes over a buffer: about 0.6 ms of the ~7 ms index
side of a 65,536-key CPU train step). The operations used here are correctly rounded in IEEE
float32 on every device and are never fused (the square root is made so: `rounded_sqrt`), so
`normal_pairs` (torch ops, any device) and the compiled kernel (`cpu_step.write_normal_rows`,
which follows the same steps) give the same bits.

For u0, u1 in [0, 1) multiples of 2**-24, the pair is r (cos a, sin a) with r = sqrt(-2 ln(u0 +
2**-24)) and a = 2 pi u1:
- ln x: x = m 2**e with m in [sqrt(1/2), sqrt(2)) (frexp, exact), s = (m - 1) / (m + 1), and
  ln m = 2 atanh(s) = s (2 + 2/3 s^2 + ... + 2/9 s^8); |s| <= 0.172, so the series' remainder is
  below 1e-9 and float32 rounding (a few ulp) dominates;
- cos a, sin a: a quarter turn q = floor(4 u1) and t = 4 u1 - q (both exact), then the Taylor
  polynomials of cos and sin on [0, pi/2) (remainders below 1e-9), rotated by q quarter turns.
So each normal is within a few float32 ulp of the exact one (the tests bound it against
float64 at 2e-6 absolute, for values up to 5.8 in size: the largest radius a 24-bit uniform
gives).
"""

from __future__ import annotations

import numpy as np
import torch

UNIT = np.float32(2.0**-24)
LN2 = np.float32(np.log(2.0))
SQRT_HALF = np.float32(np.sqrt(0.5))
HALF_PI = np.float32(np.pi / 2)
# Horner coefficients, highest power first: ln m = s * LN(s^2); sin t = t * SIN(t^2); cos t = COS(t^2).
LN = tuple(np.float32(2.0 / k) for k in (9, 7, 5, 3, 1))
SIN = tuple(np.float32((-1) ** k / float(np.prod(np.arange(1, 2 * k + 2, dtype=np.float64))))
            for k in range(6, -1, -1))
COS = tuple(np.float32((-1) ** k / float(np.prod(np.arange(1, 2 * k + 1, dtype=np.float64))))
            for k in range(7, -1, -1))


def _horner(z: torch.Tensor, coefficients: tuple[np.float32, ...]) -> torch.Tensor:
    value = torch.full_like(z, float(coefficients[0]))
    for c in coefficients[1:]:
        value = value * z + float(c)
    return value


def rounded_sqrt(y: torch.Tensor) -> torch.Tensor:
    """sqrt of float32 y >= 0, correctly rounded on every device. (torch.sqrt on the CPU is
    not: its vectorised kernel is an ulp off for ~0.6% of float32 inputs.) A float64 sqrt gives
    a float32 candidate within an ulp; it moves to a neighbour when y lies beyond the midpoint
    between them. The midpoints have 25 significant bits, so their squares, and the tests, are
    exact in float64; no float32 y equals a midpoint's square, so there are no ties."""
    wide = y.double()
    root = torch.sqrt(wide).float()
    up = torch.nextafter(root, torch.full_like(root, float("inf")))
    down = torch.nextafter(root, torch.zeros_like(root))
    above = (root.double() + up.double()) / 2
    below = (root.double() + down.double()) / 2
    return torch.where(wide > above * above, up, torch.where(wide < below * below, down, root))


def normal_pairs(u_radius: torch.Tensor, u_angle: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale r cos a, scale r sin a) elementwise for float32 uniforms of the same shape."""
    mantissa, exponent = torch.frexp(u_radius + float(UNIT))
    low = mantissa < float(SQRT_HALF)
    m = torch.where(low, mantissa * 2.0, mantissa)
    e = exponent.to(torch.float32) - low.to(torch.float32)
    f = m - 1.0
    s = f / (f + 2.0)
    ln_x = e * float(LN2) + s * _horner(s * s, LN)
    radius = rounded_sqrt(ln_x * -2.0) * float(np.float32(scale))
    v = u_angle * 4.0
    quarter = torch.floor(v)
    t = (v - quarter) * float(HALF_PI)
    z = t * t
    sin, cos = t * _horner(z, SIN), _horner(z, COS)
    first = torch.where(quarter == 0, cos, torch.where(quarter == 1, -sin, torch.where(quarter == 2, -cos, sin)))
    second = torch.where(quarter == 0, sin, torch.where(quarter == 1, cos, torch.where(quarter == 2, -sin, -cos)))
    return first * radius, second * radius
