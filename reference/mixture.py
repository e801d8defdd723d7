"""The exact oracle: a Gaussian mixture of small pictures and its closed-form denoiser (pure torch).

Data x0 ~ sum_k pi_k N(mu_k, s^2 I).  A noisy state at noise level sigma is x = alpha*x0 + sigma*eps with
alpha = 1 for the variance-exploding law used by eps / v-prediction models (x = x0 + sigma*eps) and
alpha = 1 - sigma for flow models (x = (1-sigma)*x0 + sigma*eps).  Given x, component k has likelihood
N(x; alpha*mu_k, v I) with v = alpha^2 s^2 + sigma^2, and E[x0 | x, k] = mu_k + alpha s^2 / v * (x - alpha*mu_k).
The denoiser D(x, sigma) = E[x0 | x] mixes those by the posterior responsibilities.

A linear reward r(x0) = <w, x0> + c tilts the mixture into another mixture with the same spread:
pi'_k ∝ pi_k exp(lam <w, mu_k>) and mu'_k = mu_k + lam s^2 w.  An isotropic quadratic reward
r(x0) = c + <w, x0> + (h/2) |x0|^2 (e.g. -MSE to a picture through the reference model's affine decoder, h < 0)
tilts it into a mixture too: each component's precision 1/s^2 - lam h gives the spread s'^2 = g s^2 with
g = 1 / (1 - lam h s^2), the means become mu'_k = g (mu_k + lam s^2 w), and
pi'_k ∝ pi_k exp(lam g (<w, mu_k> + (h/2) |mu_k|^2))  (complete the square; h = 0 is the linear case).
That is the exact target of reward-steered samplers (p(x) exp(lam r(x))), used by the tests and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _as_batch_sigma(sigma, batch: int, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=like.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} entries for a batch of {batch}")
    return sigma


@dataclass(frozen=True)
class GaussianMixture:
    means: torch.Tensor    # [K, *shape]
    weights: torch.Tensor  # [K], sums to 1
    spread: float          # s, the per-element standard deviation of every component

    def __post_init__(self):
        if self.means.shape[0] != self.weights.shape[0]:
            raise ValueError(f"{self.means.shape[0]} means but {self.weights.shape[0]} weights")
        if not self.spread > 0:
            raise ValueError(f"spread must be > 0, got {self.spread}")

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.means.shape[1:]

    def _flat_means(self, device) -> torch.Tensor:
        return self.means.reshape(self.num_components, -1).to(device=device, dtype=torch.float64)

    def responsibilities(self, x: torch.Tensor, sigma, flow: bool) -> torch.Tensor:
        """Posterior component probabilities gamma_k(x) at noise level sigma, shape [B, K]."""
        b = x.shape[0]
        sigma = _as_batch_sigma(sigma, b, x)[:, None]
        alpha = 1.0 - sigma if flow else torch.ones_like(sigma)
        var = alpha ** 2 * self.spread ** 2 + sigma ** 2
        mu = self._flat_means(x.device)
        xf = x.reshape(b, -1).to(torch.float64)
        # log N(x; alpha mu_k, var) up to terms equal for every k (|x|^2 cancels: no catastrophic cancellation)
        logits = (alpha * (xf @ mu.T) - 0.5 * alpha ** 2 * (mu * mu).sum(1)[None, :]) / var
        logits = logits + torch.log(self.weights.to(x.device, torch.float64))[None, :]
        return torch.softmax(logits, dim=1)

    def denoise(self, x: torch.Tensor, sigma, flow: bool = False) -> torch.Tensor:
        """D(x, sigma) = E[x0 | x] in closed form; x is [B, *shape]."""
        b = x.shape[0]
        gamma = self.responsibilities(x, sigma, flow)
        sig = _as_batch_sigma(sigma, b, x)[:, None]
        alpha = 1.0 - sig if flow else torch.ones_like(sig)
        var = alpha ** 2 * self.spread ** 2 + sig ** 2
        gain = alpha * self.spread ** 2 / var           # weight of x in E[x0|x,k]
        keep = 1.0 - alpha * gain                        # weight of mu_k
        xf = x.reshape(b, -1).to(torch.float64)
        d = keep * (gamma @ self._flat_means(x.device)) + gain * xf
        return d.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws x0 and their component indices."""
        k = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        noise = torch.randn((n,) + tuple(self.shape), generator=generator, dtype=torch.float64)
        return (self.means.double()[k] + self.spread * noise).float(), k

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """Index of the nearest component mean for each sample (exact when components are well separated)."""
        d = torch.cdist(x0.reshape(x0.shape[0], -1).double(), self._flat_means(x0.device))
        return d.argmin(dim=1)

    def expected_linear(self, w: torch.Tensor, c: float = 0.0) -> float:
        """E[<w, x0> + c] under this mixture."""
        proj = self._flat_means(w.device) @ w.reshape(-1).double()
        return float(self.weights.double().to(w.device) @ proj + c)

    def expected_quadratic(self, w: torch.Tensor, c: float = 0.0, curvature: float = 0.0) -> float:
        """E[c + <w, x0> + (curvature/2) |x0|^2] under this mixture (E|x0|^2 = |mu_k|^2 + d s^2 per component)."""
        return self.quadratic_moments(w, c, curvature)[0]

    def quadratic_moments(self, w: torch.Tensor, c: float = 0.0, curvature: float = 0.0) -> tuple[float, float]:
        """Mean and variance of r = c + <w, x0> + (h/2)|x0|^2 under this mixture (h = curvature).  In component k,
        x0 = mu_k + s e: r = r(mu_k) + s <w + h mu_k, e> + (h/2) s^2 |e|^2, whose two random terms are
        uncorrelated, with variances s^2 |w + h mu_k|^2 and (h^2/4) s^4 2d."""
        mu = self._flat_means(w.device)
        wf = w.reshape(-1).double().to(w.device)
        h, s2, d = curvature, self.spread ** 2, mu.shape[1]
        mean_k = c + mu @ wf + 0.5 * h * ((mu * mu).sum(1) + d * s2)
        var_k = s2 * ((wf[None, :] + h * mu) ** 2).sum(1) + 0.5 * h * h * s2 * s2 * d
        pi = self.weights.double().to(w.device)
        mean = pi @ mean_k
        return float(mean), float(pi @ (var_k + (mean_k - mean) ** 2))

    def tilted(self, w: torch.Tensor, lam: float, curvature: float = 0.0) -> "GaussianMixture":
        """The exact law p(x) exp(lam * (c + <w, x> + (curvature/2) |x|^2)) / Z: again a mixture of isotropic
        Gaussians (same spread when curvature = 0, the linear case)."""
        precision = 1.0 / self.spread ** 2 - lam * curvature
        if not precision > 0:
            raise ValueError(f"lambda * curvature = {lam * curvature:g} >= 1/spread^2 = {1 / self.spread ** 2:g}: "
                             "p(x) exp(lambda r(x)) cannot be normalised (lower lambda)")
        g = 1.0 / (precision * self.spread ** 2)     # s'^2 / s^2
        wf = w.reshape(-1).double().to(self.means.device)
        mu = self._flat_means(self.means.device)
        log_pi = torch.log(self.weights.double()) + lam * g * (mu @ wf + 0.5 * curvature * (mu * mu).sum(1))
        means = g * (self.means.double() + lam * self.spread ** 2 * wf.reshape(self.shape))
        return GaussianMixture(means.to(self.means.dtype), torch.softmax(log_pi, 0).to(self.weights.dtype),
                               self.spread * g ** 0.5)
