"""The diffusion core: processes, samplers, Monte-Carlo uncertainty and the two diffusion methods.

The samplers are checked against exact answers with no training: for data x0 ~ N(MU, S^2) per pixel
the optimal denoiser is known in closed form, so a correct sampler fed with it must return samples
with mean MU and standard deviation S (up to its discretisation error, which must shrink with steps).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import SAMPLE

from crossdiff.data.cases import PreparedCase
from crossdiff.data.slices import PairedSliceDataset, SliceConfig
from crossdiff.diffusion import VESDE, VPSDE, DiscreteVP, GaussianProcess, monte_carlo, sample
from crossdiff.diffusion.predictions import PREDICTIONS, prediction_target, to_x0_eps
from crossdiff.diffusion.processes import per_sample
from crossdiff.diffusion.samplers import SampleResult
from crossdiff.errors import CrossdiffError
from crossdiff.intensity import fit_scaling
from crossdiff.methods.base import DataSpec, StepContext, Translation
from crossdiff.methods.diffusion import ConditionalDDPM, ConditionalScoreSDE
from crossdiff.readers import read_volume
from crossdiff.volumes import coverage, resample_to

MU, S = 0.3, 0.5
PIXELS = (8, 1, 64, 64)  # 32768 independent pixels
# Tolerance on the sample mean and standard deviation. Sampling noise: SE(mean) = S / sqrt(32768) =
# 0.0028, SE(std) = S / sqrt(2 * 32768) = 0.0020. Known biases: the prior N(0, prior_std^2) misses the
# data's mean at t = 1 by alpha(1) MU (VP: <= 0.002) or, for VE, shifts the output by ~MU S / sigma_max
# = 0.003; the final x0_hat at t_min shrinks the std by < 0.1 %. 0.015 is five standard errors above those.
TOL = 0.015
PROCESSES = {
    "ddpm-linear": DiscreteVP(1000, "linear"),
    "ddpm-cosine": DiscreteVP(1000, "cosine"),
    "vp-sde": VPSDE(0.1, 20.0),
    "ve-sde": VESDE(0.01, 50.0),
}
# (sampler, options, step counts): the last count is where the sampler must have converged to within
# TOL (first-order samplers need ~1000 steps for DDPM's ancestral kernel, 200 for the others; Heun is
# second order; RK45 is adaptive and ignores steps).
SAMPLER_CASES = [
    ("ddpm", {}, (10, 50, 1000)),
    ("ddim", {"eta": 0.0}, (10, 50, 200)),
    ("ddim", {"eta": 0.5}, (10, 50, 200)),
    ("em", {}, (10, 50, 200)),
    ("pc", {"predictor": "reverse-diffusion", "snr": 0.16}, (10, 50, 200)),
    ("pc", {"predictor": "em", "snr": 0.5}, (10, 50, 200)),
    ("ode", {"solver": "heun"}, (10, 50, 100)),
    ("ode", {"solver": "rk45", "rtol": 1e-5, "atol": 1e-5}, (1,)),
]


def gaussian_denoiser(process: GaussianProcess):
    """The exact E[x0 | x_t] for x0 ~ N(MU, S^2): MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha MU)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = per_sample(process.alpha(t), x), per_sample(process.sigma(t), x)
        x0_hat = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
        return x0_hat, (x - alpha * x0_hat) / sigma

    return denoise


def _expected_std(name: str, options: dict) -> float:
    """S, except for pc, whose Langevin corrector is unadjusted (no Metropolis step) and so widens the
    samples by a known factor. On N(m, v) a step x' = x + h score + sqrt(2h) z keeps the variance V
    where V = (1 - h/v)^2 V + 2h, i.e. V = v / (1 - h / 2v); score_sde's step h = 2 snr^2 |z|^2 / |score|^2
    with |z|^2 = D and |score|^2 = D V / v^2 makes h / 2v = snr^2 v / V, so V = v (1 + snr^2)."""
    return S * math.sqrt(1.0 + options["snr"] ** 2) if name == "pc" else S


@pytest.mark.parametrize("process_name", list(PROCESSES))
@pytest.mark.parametrize(("name", "options", "counts"), SAMPLER_CASES, ids=lambda v: str(v))
def test_samplers_recover_gaussian_data_with_the_exact_denoiser(
    process_name: str, name: str, options: dict, counts: tuple[int, ...]
) -> None:
    process = PROCESSES[process_name]
    errors = []
    for steps in counts:
        generator = torch.Generator().manual_seed(0)
        x = sample(
            name,
            gaussian_denoiser(process),
            process,
            process.prior_sample(PIXELS, generator),
            steps,
            generator,
            **options,
        ).x
        mean_error = abs(float(x.mean()) - MU)
        errors.append(abs(float(x.std()) - _expected_std(name, options)))
        if name in ("ddpm", "ddim") or steps == counts[-1]:
            # ddpm/ddim keep the mean exact at any step count: every step is affine with E[x0_hat] = MU.
            assert mean_error < TOL, f"{name} {options} at {steps} steps: mean off by {mean_error:.4f}"
    assert errors[-1] < TOL, f"{name} {options}: std off by {errors} at {counts} steps"
    # Convergence: more steps never make the std error grow beyond the statistical tolerance.
    assert all(later <= max(earlier, TOL) for earlier, later in itertools.pairwise(errors)), errors


def test_ddim_with_eta_one_is_ancestral_sampling() -> None:
    """DDIM's eta = 1 is DDPM's posterior (Song et al. 2021a): two formulas, one distribution, same draws."""
    process = PROCESSES["ddpm-cosine"]
    runs = []
    for name, options in (("ddpm", {}), ("ddim", {"eta": 1.0})):
        generator = torch.Generator().manual_seed(3)
        start = process.prior_sample((2, 1, 8, 8), generator)
        runs.append(sample(name, gaussian_denoiser(process), process, start, 20, generator, **options).x)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("process_name", ["ddpm-linear", "ve-sde"])
def test_predictions_convert_back_to_the_clean_image_and_noise(prediction: str, process_name: str) -> None:
    process = PROCESSES[process_name]
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1, torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.tensor([0.001, 0.2, 0.7, 1.0])
    alpha, sigma = per_sample(process.alpha(t), x0), per_sample(process.sigma(t), x0)
    target = prediction_target(prediction, x0, noise, alpha, sigma)
    x0_hat, eps_hat = to_x0_eps(prediction, target, alpha * x0 + sigma * noise, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=2e-3, rtol=0)


def test_discrete_process_matches_the_ddpm_table_on_its_grid() -> None:
    """On t = (i+1)/T, alpha^2 is DDPM's alphas_cumprod[i] and the network sees index i; a 1000-step
    grid visits every index once, a 50-step grid evenly spaced ones from T-1 down to 0."""
    process = DiscreteVP(1000, "linear")
    index = torch.tensor([0, 1, 499, 999])
    t = (index + 1).float() / 1000
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(process.alpha(t).double() ** 2, torch.cumprod(1 - betas, 0)[index], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(process.network_time(t), index.float())
    assert torch.equal(torch.round(process.time_grid(1000) * 1000), torch.arange(1000, 0, -1, dtype=torch.float64))
    coarse = torch.round(process.time_grid(50) * 1000) - 1
    assert coarse[0] == 999 and coarse[-1] == 0 and len(set(coarse.tolist())) == 50
    with pytest.raises(CrossdiffError, match="1..1000"):
        process.time_grid(1001)


# ---- the methods, with a tiny untrained network -------------------------------------------------

TINY = {"channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8, "num_head_channels": 8}
DATA = DataSpec(source_channels=3, target_channels=1, size=(32, 32))


@pytest.fixture(scope="module")
def methods() -> dict[str, ConditionalDDPM | ConditionalScoreSDE]:
    torch.manual_seed(0)
    return {
        "cddpm": ConditionalDDPM({**TINY, "schedule": "cosine", "prediction": "v"}, DATA),
        "score-vp": ConditionalScoreSDE({**TINY, "sde": "vp"}, DATA),
        "score-ve": ConditionalScoreSDE({**TINY, "sde": "ve", "prediction": "x0"}, DATA),
    }


@pytest.fixture(scope="module")
def source() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1


# sampler options and the NFE each must report for 4 steps
NFE_CASES = [
    ({"sampler": "ddpm"}, 4),
    ({"sampler": "ddim", "eta": 0.3}, 4),
    ({"sampler": "em"}, 4),
    ({"sampler": "pc", "corrector_steps": 1}, 8),
    ({"sampler": "pc", "corrector_steps": 2, "predictor": "em"}, 12),
    ({"sampler": "ode", "solver": "heun"}, 7),
    ({"sampler": "ode", "solver": "rk45", "rtol": 1e-3, "atol": 1e-3}, None),
]


@pytest.mark.parametrize("method_name", ["cddpm", "score-vp", "score-ve"])
@pytest.mark.parametrize(("options", "nfe"), NFE_CASES, ids=lambda v: str(v))
def test_every_sampler_translates_with_every_method(methods, source, method_name, options, nfe) -> None:
    method = methods[method_name]
    calls = []
    hook = method.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = method.translate(source, torch.Generator().manual_seed(0), samples=1, steps=4, **options)
    finally:
        hook.remove()
    assert result.samples.shape == (1, 2, 1, 32, 32)
    assert torch.isfinite(result.samples).all()
    assert result.samples.abs().max() <= 1.0
    assert result.nfe == len(calls)  # the reported NFE is the number of network calls
    assert result.nfe == nfe if nfe is not None else result.nfe > 1


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "ddim", "eta": 0.0},
        {"sampler": "ode", "solver": "heun"},
        {"sampler": "ode", "solver": "rk45", "rtol": 1e-3, "atol": 1e-3},
    ],
    ids=str,
)
def test_deterministic_samplers_depend_only_on_the_start_noise(methods, source, options) -> None:
    method = methods["score-vp"]
    options = dict(options)
    name = options.pop("sampler")
    start = method.process.prior_sample((2, 1, 32, 32), torch.Generator().manual_seed(7))
    outputs = [
        sample(
            name, method.denoiser(source), method.process, start, 5, torch.Generator().manual_seed(seed), **options
        ).x
        for seed in (1, 2)
    ]
    assert torch.equal(outputs[0], outputs[1])
    stochastic = [
        sample(
            "ddim", method.denoiser(source), method.process, start, 5, torch.Generator().manual_seed(seed), eta=1.0
        ).x
        for seed in (1, 2)
    ]
    assert not torch.equal(stochastic[0], stochastic[1])  # the check above can tell the difference


@pytest.mark.parametrize(
    "options", [{"sampler": "ddpm"}, {"sampler": "pc"}, {"sampler": "ode", "solver": "heun"}], ids=str
)
def test_monte_carlo_draws_spread_and_repeat_with_the_seed(methods, source, options) -> None:
    method = methods["cddpm"]

    def translate(seed: int) -> Translation:
        return method.translate(source, torch.Generator().manual_seed(seed), samples=3, steps=3, batch=4, **options)

    first, again, other = translate(11), translate(11), translate(12)
    assert first.samples.shape == (3, 2, 1, 32, 32)
    assert torch.equal(first.samples, again.samples)
    assert first.std is not None and float(first.std.mean()) > 1e-3
    assert not torch.equal(other.samples, first.samples)


def test_monte_carlo_bounds_each_chunk_and_keeps_draws_in_order() -> None:
    source = torch.arange(5.0).reshape(5, 1, 1, 1)
    chunks = []

    def draw(chunk: torch.Tensor) -> SampleResult:
        chunks.append(chunk.shape[0])
        return SampleResult(chunk * 10, nfe=len(chunks))

    result = monte_carlo(draw, source, samples=3, batch=4)
    assert chunks == [4, 4, 4, 3]
    assert result.x.shape == (3, 5, 1, 1, 1) and result.nfe == 4
    assert torch.equal(result.x[:, :, 0, 0, 0], (torch.arange(5.0) * 10).expand(3, 5))


def test_unknown_samplers_options_and_settings_are_clear_errors(methods, source) -> None:
    method = methods["cddpm"]
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(CrossdiffError, match="does not take snr"):
        method.translate(source, generator, sampler="ddim", snr=0.1)
    with pytest.raises(CrossdiffError, match="unknown sampler 'heun'"):
        method.translate(source, generator, sampler="heun")
    with pytest.raises(CrossdiffError, match="eta"):
        method.translate(source, generator, sampler="ddim", eta=2.0)
    with pytest.raises(CrossdiffError, match="does not take snr"):
        ConditionalDDPM({**TINY, "sampler_options": {"snr": 0.1}}, DATA)
    with pytest.raises(CrossdiffError, match="learning_rate"):
        ConditionalDDPM({"learning_rate": 1e-3}, DATA)
    with pytest.raises(CrossdiffError, match="sde"):
        ConditionalScoreSDE({**TINY, "sde": "sub-vp"}, DATA)


def test_score_sde_chooses_its_sampler_and_sigma_max_and_records_them() -> None:
    ve = ConditionalScoreSDE({**TINY, "sde": "ve"}, DataSpec(1, 1, (64, 64)))
    assert ve.config["sigma_max"] == 64.0 and ve.process.prior_std == 64.0
    assert (ve.config["sampler"], ve.config["steps"]) == ("pc", 50)
    assert ConditionalScoreSDE(ve.config, DataSpec(1, 1, (64, 64))).config == ve.config
    vp = ConditionalScoreSDE({**TINY, "sampler": "ddim"}, DATA)
    assert vp.config["sampler"] == "ddim" and ConditionalScoreSDE(TINY, DATA).config["sampler"] == "ode"


@pytest.mark.parametrize(("method_name", "nfe"), [("cddpm", 50), ("score-vp", 49)])
def test_default_sampling_costs_what_the_defaults_say(methods, source, method_name, nfe) -> None:
    """cddpm: 50-step DDIM; score-sde on VP: 25-step Heun ODE, 2 * 25 - 1 network calls."""
    result = methods[method_name].translate(source[:1], torch.Generator().manual_seed(0))
    assert result.nfe == nfe and result.samples.shape == (1, 1, 1, 32, 32)


# ---- learning on real slices --------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_batch() -> dict[str, torch.Tensor]:
    """Eight 32 x 32 MR -> CT slices of the bundled STS_003 case (resized whole, 2.5-D with one neighbour)."""
    ct, mr = read_volume(SAMPLE / "ct.nii.gz"), read_volume(SAMPLE / "mr.nii.gz")
    mr_on_ct = resample_to(mr, ct)
    mask = (ct.array > -500) & coverage(mr, ct)
    scalings = {"ct": fit_scaling(ct), "mr": fit_scaling(mr_on_ct, mask)}
    images = {key: scalings[key].apply(volume.array) for key, volume in (("ct", ct), ("mr", mr_on_ct))}
    case = PreparedCase("STS_003", images, mask, ct.geometry, scalings)
    config = SliceConfig(size=(32, 32), fit="resize", context=1, min_mask_fraction=0.2)
    dataset = PairedSliceDataset([case], "mr", "ct", config)
    items = [dataset[i] for i in torch.linspace(0, len(dataset) - 1, 8).long().tolist()]
    return {key: torch.stack([item[key] for item in items]) for key in ("source", "target", "mask")}


def _held_out_loss(method, batch: dict[str, torch.Tensor]) -> float:
    """The denoising loss at the same 16 draws of (t, noise) every time it is asked."""
    return sum(method.validation_loss(batch, torch.Generator().manual_seed(100 + i)) for i in range(16)) / 16


@pytest.mark.parametrize(("method_class", "prediction"), [(ConditionalDDPM, "epsilon"), (ConditionalScoreSDE, "v")])
def test_training_steps_lower_the_denoising_loss_on_real_slices(real_batch, method_class, prediction) -> None:
    torch.manual_seed(0)
    config = {**TINY, "lr": 2e-3, "prediction": prediction}
    method = method_class(config, DataSpec(source_channels=3, size=(32, 32)))
    optimizer = method.optimizers()["model"][0]

    def optimize(name: str, loss: torch.Tensor) -> None:
        assert name == "model"
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    before = _held_out_loss(method, real_batch)
    generator = torch.Generator().manual_seed(0)
    for step in range(50):
        logged = method.training_step(real_batch, StepContext(optimize, generator, torch.device("cpu"), step))
        assert math.isfinite(logged["loss"])
    after = _held_out_loss(method, real_batch)
    # An untrained net scores about the variance of the target (1 for eps, ~0.55 here for v); learning
    # to read the noise out of x_t and the CT out of the MR at least halves it (measured: eps 1.0 -> 0.04,
    # v 0.56 -> 0.17; with lr 0 neither moves).
    assert after < 0.5 * before, (before, after)
