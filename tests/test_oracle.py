"""The analytic reference model: its denoiser through ComfyUI's model code equals the closed form, ComfyUI's own
ODE samplers reproduce the mixture, and the tilted-law helper matches brute force."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import harness

PARAMS = ["eps", "v_prediction", "flow"]


def closed_form_denoiser(means, weights, s, x, sigma, flow):
    """Written independently of reference/mixture.py: full Gaussian log-densities in float64."""
    x = x.double().reshape(x.shape[0], -1)
    mu = means.double().reshape(means.shape[0], -1)
    out = []
    for xi, sg in zip(x, sigma.double()):
        a = 1 - sg if flow else torch.tensor(1.0, dtype=torch.float64)
        var = a * a * s * s + sg * sg
        logp = torch.log(weights.double()) - ((xi[None] - a * mu) ** 2).sum(1) / (2 * var) \
            - 0.5 * mu.shape[1] * torch.log(2 * math.pi * var)
        g = torch.softmax(logp, 0)
        post = mu + (a * s * s / var) * (xi[None] - a * mu)
        out.append((g[:, None] * post).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("parametrization", PARAMS)
def test_denoiser_through_comfy_equals_closed_form(parametrization):
    cm = harness.pack_submodule("reference.comfy_model")
    spec = cm.ReferenceSpec(components=8, spread=0.1, weights=(1, 2, 3, 4, 4, 3, 2, 1), parametrization=parametrization)
    patcher = cm.build_reference_model(spec)
    base = patcher.model
    ms = base.model_sampling
    gen = torch.Generator().manual_seed(1)
    mix = spec.mixture(8, 8)
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    # half spread over the whole range, half where noise is comparable to the distance between pictures
    # (noise-to-signal 3..30), where the posterior over pictures is genuinely uncertain
    spread_out = torch.exp(torch.empty(12).uniform_(math.log(lo), math.log(hi), generator=gen))
    nsr = torch.empty(12).uniform_(3, 30, generator=gen)
    ambiguous = nsr / (1 + nsr) if parametrization == "flow" else nsr
    sigmas = torch.cat([spread_out, ambiguous])
    if parametrization == "flow":
        sigmas = sigmas.clamp(max=0.999)
    # states drawn from the model's own marginal at each sigma, so responsibilities are non-trivial
    x0, _ = mix.sample(24, gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = (1 - sigmas if parametrization == "flow" else torch.ones_like(sigmas)).view(-1, 1, 1, 1)
    x = a * x0 + sigmas.view(-1, 1, 1, 1) * eps
    with torch.inference_mode():
        d = base.apply_model(x, sigmas, transformer_options={"sigmas": sigmas})
    expected = closed_form_denoiser(mix.means, mix.weights, spec.spread, x, sigmas, parametrization == "flow")
    err = (d.double().reshape(24, -1) - expected).abs().max(dim=1).values
    # float32 network outputs at huge sigma lose ~1e-7 relative of |x|; the tolerance scales with sigma
    assert torch.all(err <= 2e-5 * (1 + sigmas.double() * 10)), err
    # and the posterior is not trivial at mid sigma: some responsibilities are neither 0 nor 1
    mid = mix.responsibilities(x, sigmas, parametrization == "flow")
    assert ((mid > 0.01) & (mid < 0.99)).any()


def sample_reference(executor, parametrization, sampler, steps, batch, weights, seed, scheduler="normal"):
    prompt = {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": parametrization, "components": 8, "spread": 0.1,
                         "weights": ",".join(map(str, weights))}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "3": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler,
                         "scheduler": scheduler, "denoise": 1.0}},
    }
    out = executor.run(prompt, want=("3",))
    return out["3"][0][0]["samples"]


@pytest.mark.parametrize("parametrization,sampler,scheduler",
                         [("eps", "euler", "normal"), ("v_prediction", "heun", "karras"), ("flow", "euler", "simple")])
def test_plain_ode_sampling_reproduces_component_frequencies(executor, parametrization, sampler, scheduler):
    cm = harness.pack_submodule("reference.comfy_model")
    weights = (1, 2, 3, 4, 4, 3, 2, 1)
    n = 800
    samples = sample_reference(executor, parametrization, sampler, 30, n, weights, seed=7, scheduler=scheduler)
    assert samples.shape == (n, 3, 8, 8)
    mix = cm.ReferenceSpec(components=8, spread=0.1, weights=weights, parametrization=parametrization).mixture(8, 8)
    labels = mix.classify(samples)
    # samples sit on their picture: the distance to the nearest mean is what the spread predicts, not more
    resid = (samples - mix.means[labels]).reshape(n, -1).pow(2).mean(1).sqrt()
    assert resid.mean() < 0.2, resid.mean()
    counts = torch.bincount(labels, minlength=8).double()
    expected = mix.weights.double() / mix.weights.double().sum() * n
    chi2, p = stats.chisquare(counts.numpy(), expected.numpy())
    assert p > 0.01, (counts.tolist(), expected.tolist(), chi2)


def test_chi_square_test_would_catch_a_wrong_law(executor):
    """The frequency test above has power: samples from uniform weights fail against skewed weights."""
    cm = harness.pack_submodule("reference.comfy_model")
    samples = sample_reference(executor, "flow", "euler", 30, 800, (1,) * 8, seed=3)
    skewed = cm.ReferenceSpec(weights=(1, 2, 3, 4, 4, 3, 2, 1), parametrization="flow").mixture(8, 8)
    counts = torch.bincount(skewed.classify(samples), minlength=8).double()
    _, p = stats.chisquare(counts.numpy(), (skewed.weights.double() / skewed.weights.double().sum() * 800).numpy())
    assert p < 1e-4


def test_exact_target_node_matches_sampled_mean_reward(executor):
    """Plain sampling's mean colour reward agrees with the Exact Target node's E_p[r] (4 standard errors)."""
    prompt = {
        "1": {"class_type": "RewardSteerReferenceModel",
              "inputs": {"parametrization": "flow", "components": 8, "spread": 0.1, "weights": "1,2,3,4,4,3,2,1"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 400}},
        "3": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": 11, "steps": 30, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 1]}},
        "5": {"class_type": "RewardSteerColorReward",
              "inputs": {"mode": "toward colour", "red": 0.9, "green": 0.2, "blue": 0.2, "bias": 0.0}},
        "6": {"class_type": "RewardSteerScoreImages", "inputs": {"images": ["4", 0], "reward": ["5", 0]}},
        "7": {"class_type": "RewardSteerReferenceExactTarget",
              "inputs": {"model": ["1", 0], "reward": ["5", 0], "latent": ["2", 0], "lam": 10.0}},
    }
    executor.run(prompt)
    scores = torch.tensor(executor.history["outputs"]["6"]["scores"])
    target = executor.history["outputs"]["7"]["target"][0]
    se = scores.std() / math.sqrt(len(scores))
    assert abs(scores.mean() - target["expected_reward_base"]) < 4 * se, (scores.mean(), target)
    # the tilt moves mass toward the redder pictures
    assert target["expected_reward_tilted"] > target["expected_reward_base"] + 0.03


def test_tilted_law_helper_matches_brute_force_quadrature():
    mixture = harness.pack_submodule("reference.mixture")
    means = torch.tensor([[-1.0, 0.5], [0.8, 0.2], [0.1, -0.9]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    s, lam, w, c = 0.3, 1.7, torch.tensor([0.9, -0.4]), 0.25
    mix = mixture.GaussianMixture(means, weights, s)
    tilted = mix.tilted(w, lam)
    # brute force on a grid: p(x) exp(lam r(x)), split by component
    g = torch.linspace(-4, 4, 1601, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    tilt = torch.exp(lam * (pts @ w.double() + c))
    masses, firsts = [], []
    for k in range(3):
        dens = weights[k].double() * torch.exp(-((pts - means[k].double()) ** 2).sum(1) / (2 * s * s)) / (2 * math.pi * s * s)
        masses.append((dens * tilt).sum())
        firsts.append(((dens * tilt)[:, None] * pts).sum(0) / (dens * tilt).sum())
    masses = torch.stack(masses)
    assert torch.allclose(tilted.weights.double(), masses / masses.sum(), atol=1e-6)
    assert torch.allclose(tilted.means.double(), torch.stack(firsts), atol=1e-5)
    # expected reward under the tilted law, both ways
    total = sum((m * f) for m, f in zip(masses / masses.sum(), firsts))
    assert abs(tilted.expected_linear(w, c) - (float(total @ w.double()) + c)) < 1e-5


def test_quadratic_tilt_helper_matches_brute_force_quadrature():
    """p(x) exp(lam r(x)) for r = c + <w, x> + (h/2)|x|^2 (h < 0: like -MSE to a picture), on a 2-D grid:
    weights, means, spread and expected reward of the tilted mixture, and E[r] under the untilted one."""
    mixture = harness.pack_submodule("reference.mixture")
    means = torch.tensor([[-1.0, 0.5], [0.8, 0.2], [0.1, -0.9]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    s, lam, w, c, h = 0.3, 1.7, torch.tensor([0.9, -0.4]), 0.25, -2.6
    mix = mixture.GaussianMixture(means, weights, s)
    tilted = mix.tilted(w, lam, curvature=h)
    g = torch.linspace(-4, 4, 1601, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    r = pts @ w.double() + c + 0.5 * h * (pts * pts).sum(1)
    cell = float(g[1] - g[0]) ** 2
    base = [weights[k].double() * torch.exp(-((pts - means[k].double()) ** 2).sum(1) / (2 * s * s))
            / (2 * math.pi * s * s) for k in range(3)]
    q = [b * torch.exp(lam * r) for b in base]                     # tilted, split by component
    masses = torch.stack([qk.sum() for qk in q])
    firsts = torch.stack([(qk[:, None] * pts).sum(0) / qk.sum() for qk in q])
    spreads = torch.stack([((qk * ((pts - m) ** 2).sum(1)).sum() / qk.sum() / 2).sqrt() for qk, m in zip(q, firsts)])
    rewards = torch.stack([(qk * r).sum() / qk.sum() for qk in q])
    assert torch.allclose(tilted.weights.double(), masses / masses.sum(), atol=1e-6)
    assert torch.allclose(tilted.means.double(), firsts, atol=1e-5)
    assert torch.allclose(torch.full((3,), tilted.spread, dtype=torch.float64), spreads, atol=1e-5)
    assert tilted.spread < s   # the quadratic tilt narrows every component
    assert abs(tilted.expected_quadratic(w, c, h) - float(masses / masses.sum() @ rewards)) < 1e-5
    assert abs(mix.expected_quadratic(w, c, h) - float((sum(base) * r).sum() * cell)) < 1e-5
    # the variance of the reward too, under both laws
    mean, var = tilted.quadratic_moments(w, c, h)
    qt = sum(q) / sum(q).sum()
    assert abs(mean - float((qt * r).sum())) < 1e-5 and abs(var - float((qt * (r - mean) ** 2).sum())) < 1e-5
    mean, var = mix.quadratic_moments(w, c, h)
    assert abs(var - float((sum(base) * (r - mean) ** 2).sum() * cell)) < 1e-5
    with pytest.raises(ValueError, match="cannot be normalised"):
        mix.tilted(w, lam=-5.0, curvature=h)   # exp(+|x|^2 ...): no normalisable tilt


def test_latent_quadratic_form_recovers_neg_mse_to_a_picture():
    """-MSE to any picture, through the reference decoder, is c + <w, z> + (h/2)|z|^2 with h = -1/(2 d)
    (image = (z + 1)/2 on 8x8 blocks, mean over the image's pixels and channels); cosine is refused."""
    cm = harness.pack_submodule("reference.comfy_model")
    target = harness.pack_submodule("reference.target")
    rewards = harness.pack_submodule("rewards")
    picture = torch.rand(1, 32, 40, 3, generator=torch.Generator().manual_seed(4))   # not block-constant
    reward = rewards.ImageSimilarityReward(picture)
    shape = (3, 4, 5)
    w, c, h = target.latent_quadratic_form(reward, cm.latent_to_image, shape)
    d = 3 * 4 * 5
    assert abs(h - (-1.0 / (2 * d))) < 1e-6
    z = torch.randn((5,) + shape, generator=torch.Generator().manual_seed(5))
    zf = z.reshape(5, -1).double()
    predicted = c + zf @ w.reshape(-1).double() + 0.5 * h * zf.pow(2).sum(1)
    assert torch.allclose(predicted, reward(cm.latent_to_image(z)).double(), atol=1e-5)
    assert target.latent_reward_form(reward, cm.latent_to_image, shape)[2] == h
    colour = rewards.LinearColorReward((1.0, -2.0, 0.5))
    assert target.latent_reward_form(colour, cm.latent_to_image, shape)[2] == 0.0
    cosine = rewards.ImageSimilarityReward(picture, metric="cosine")
    with pytest.raises(target.NotQuadraticError, match="not an isotropic quadratic"):
        target.latent_quadratic_form(cosine, cm.latent_to_image, shape)


def test_latent_linear_form_recovers_the_colour_weights():
    cm = harness.pack_submodule("reference.comfy_model")
    target = harness.pack_submodule("reference.target")
    rewards = harness.pack_submodule("rewards")
    reward = rewards.LinearColorReward((1.0, -2.0, 0.5), bias=0.3)
    w, c = target.latent_linear_form(reward, cm.latent_to_image, (3, 4, 4))
    # image = (z + 1) / 2 upsampled; mean over pixels -> each latent pixel carries weight_c / 2 / 16
    expected = torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1).expand(3, 4, 4) / 32
    assert torch.allclose(w, expected, atol=1e-7)
    assert abs(c - (0.3 + (1.0 - 2.0 + 0.5) / 2)) < 1e-6
    sim = rewards.ImageSimilarityReward(torch.rand(1, 8, 8, 3))
    with pytest.raises(target.NotLinearError):
        target.latent_linear_form(sim, cm.latent_to_image, (3, 4, 4))


def test_reference_vae_is_exact_through_comfy_vae_code():
    cm = harness.pack_submodule("reference.comfy_model")
    vae = cm.ReferenceVAE()
    z = torch.randn(2, 3, 16, 20)
    img = vae.decode(z)
    assert img.shape == (2, 128, 160, 3)
    assert torch.allclose(img, cm.latent_to_image(z), atol=1e-7)
    assert torch.allclose(vae.encode(img), z, atol=1e-6)  # encode inverts decode
    tiled = vae.decode_tiled(z, tile_x=8, tile_y=8, overlap=2)  # tile-safe: same answer
    assert torch.allclose(tiled, img, atol=1e-6)


def test_tiny_unet_runs_real_sd15_code_deterministically(executor):
    def run(prompt_text, seed):
        prompt = {
            "1": {"class_type": "RewardSteerTinyTestModel", "inputs": {"seed": 0, "prompt": prompt_text}},
            "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
            "3": {"class_type": "KSampler",
                  "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                             "seed": seed, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                             "scheduler": "normal", "denoise": 1.0}},
            "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 1]}},
        }
        out = executor.run(prompt, want=("3", "4"))
        return out["3"][0][0]["samples"], out["4"][0][0]

    lat_a, img_a = run("a red apple", 5)
    lat_b, _ = run("a red apple", 5)
    lat_c, _ = run("a blue car", 5)
    assert lat_a.shape == (2, 4, 8, 8) and img_a.shape == (2, 64, 64, 3)
    assert torch.isfinite(lat_a).all() and torch.isfinite(img_a).all()
    assert torch.equal(lat_a, lat_b)            # same workflow + seed => same latent
    assert not torch.allclose(lat_a, lat_c)     # the prompt reaches the real cross-attention
    import comfy.model_base
    model = executor.node_classes["RewardSteerTinyTestModel"].execute(0, "x")[0]
    assert type(model.model.diffusion_model).__name__ == "UNetModel"
    assert isinstance(model.model, comfy.model_base.BaseModel)


@pytest.mark.parametrize("parametrization", PARAMS)
def test_samplercustom_and_advanced_run_the_reference_model_like_ksampler(executor, parametrization):
    """The same seed, sampler and sigmas through KSampler, SamplerCustom and SamplerCustomAdvanced give the same
    samples: the reference model needs nothing special from any of ComfyUI's sampling entry points."""
    model = {"class_type": "RewardSteerReferenceModel",
             "inputs": {"parametrization": parametrization, "components": 8, "spread": 0.1, "weights": ""}}
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}}
    prompt = {
        "1": model, "2": latent,
        "3": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0],
                         "seed": 9, "steps": 12, "cfg": 2.0, "sampler_name": "heun", "scheduler": "beta",
                         "denoise": 1.0}},
        "4": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}},
        "5": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "beta", "steps": 12,
                                                         "denoise": 1.0}},
        "6": {"class_type": "SamplerCustom",
              "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 9, "cfg": 2.0, "positive": ["1", 2],
                         "negative": ["1", 2], "sampler": ["4", 0], "sigmas": ["5", 0], "latent_image": ["2", 0]}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}},
        "8": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["1", 2], "negative": ["1", 2],
                                                    "cfg": 2.0}},
        "9": {"class_type": "SamplerCustomAdvanced",
              "inputs": {"noise": ["7", 0], "guider": ["8", 0], "sampler": ["4", 0], "sigmas": ["5", 0],
                         "latent_image": ["2", 0]}},
    }
    out = executor.run(prompt, want=("3", "6", "9"))
    a, b, c = (out[k][0][0]["samples"] for k in ("3", "6", "9"))
    assert torch.isfinite(a).all() and a.shape == (4, 3, 8, 8)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    # and they are real samples: every one sits on a picture.  (Heun on a 12-step karras grid would not: its
    # large steps below sigma ~ spread over-disperse each component about 2.3x; see tests/test_exactness.py.)
    mix = harness.pack_submodule("reference.comfy_model").ReferenceSpec().mixture(8, 8)
    resid = (a - mix.means[mix.classify(a)]).reshape(4, -1).pow(2).mean(1).sqrt()
    assert (resid < 0.2).all()
