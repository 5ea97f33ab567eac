"""Can a critic tell SynDiff's generated reverse steps from true ones at all? A probe on a trained run.

In every SynDiff run so far the critic's loss stayed at 2 ln 2 and its held-out accuracy at chance, so the
adversarial term taught the generator nothing. That has two readings: the generated x_{t-k} carry no
signal a critic could find (the posterior noise hides the difference), or the critic had too few steps at
SynDiff's learning rate to find it. This probe separates them. It freezes a trained run's generator (its
EMA weights, the ones translation uses) and trains critics alone against it, on the run's own training
patients and patches: a fresh critic at each `--lr`, and the run's own critic continued at its rate. Every
`--eval-every` steps it measures held-out accuracy (the run's validation patient: carved from the training
patients as `crossdiff train` does, never a test patient) per reverse step j, on fixed batches, and the
separation an oracle that knows the true x0 would have: the posterior means differ by
c_j (x0 - x0_hat) under the same posterior std s_j, so per pixel |mean difference| / s_j, and per image
the optimal test's accuracy Phi(||mean difference|| / 2 s_j). At j = 1 the posterior has no noise: the
critic compares the generator's x0 estimate with the true target directly.

Run:  python benchmarks/syndiff_critic_probe.py --run OUT/runs/fold1/syndiff-patch \
          --manifest OUT/folds/fold1/manifest.json --cache OUT/cache --out benchmarks/results/syndiff-critic-probe
Writes OUT/probe.md and OUT/probe.json.
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from crossdiff.atomic import write_json, write_text
from crossdiff.data.cases import PreparationConfig, prepare_cases
from crossdiff.data.manifest import load_manifest, validation_cases
from crossdiff.data.slices import PairedSliceDataset, SliceConfig
from crossdiff.inference import load_model
from crossdiff.methods.syndiff import SynDiffMethod
from crossdiff.methods.unet import adamw
from crossdiff.training import seed_everything


def datasets(run: Path, manifest: Path, cache: Path) -> tuple[PairedSliceDataset, PairedSliceDataset, list[str], list[str]]:
    """The run's training patches (augmented, as trained) and its validation patient's slices."""
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    source, target = config["model"]["source"], config["model"]["target"]
    loaded = load_manifest(manifest)
    paired = set(loaded.cases_with(source, target))
    train_ids, val_ids, _ = validation_cases([c for c in loaded.split_cases("train") if c in paired],
                                             [c for c in loaded.split_cases("val") if c in paired],
                                             int(config["training"]["seed"]))
    preparation = PreparationConfig.from_dict({"modalities": [source, target], "reference": target,
                                               **config.get("preparation", {})})
    prepared = dict(zip(train_ids + val_ids, prepare_cases(((cid, loaded.cases[cid]) for cid in train_ids + val_ids),
                                                           preparation, cache)))
    slices = SliceConfig.from_dict(config["slices"])
    train = PairedSliceDataset([prepared[c] for c in train_ids], source, target, slices, augment=True)
    held_out = PairedSliceDataset([prepared[c] for c in val_ids], source, target, slices, augment=True)
    return train, held_out, train_ids, val_ids


def held_out_batches(data: PairedSliceDataset, batch: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Fixed held-out patches: the same ones at every evaluation."""
    seed_everything(seed)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return [b for b, _ in zip(loader, range(count))]


@torch.no_grad()
def evaluate(method: SynDiffMethod, critic: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
             seed: int) -> dict[str, Any]:
    """Per reverse step j: the critic's accuracy on true and generated x_{t-k}, and the oracle's separation."""
    critic.eval()
    rows = {}
    schedule = method.schedule
    for j in range(1, schedule.steps + 1):
        generator = torch.Generator().manual_seed(seed + j)
        real_right = fake_right = total = 0.0
        ratio = oracle = 0.0
        for batch in batches:
            x0 = batch["target"]
            step = method._reverse_step(method.generator, x0, batch["source"], generator, j=j)
            on_real = critic(step.real, step.x_t, step.t).float()
            on_fake = critic(step.fake, step.x_t, step.t).float()
            real_right += float((on_real > 0).float().mean()) * len(x0)
            fake_right += float((on_fake < 0).float().mean()) * len(x0)
            total += len(x0)
            weight, spread = method.schedule.posterior_terms(j)
            difference = weight * (x0 - step.x0_hat)
            if spread > 0:
                ratio += float(difference.abs().mean()) / spread * len(x0)
                norms = difference.flatten(1).norm(dim=1) / (2 * spread)
                oracle += float(sum(0.5 * (1 + math.erf(float(n) / math.sqrt(2))) for n in norms))
            else:  # no posterior noise: a true and a generated x_{t-k} differ wherever x0_hat differs from x0
                ratio, oracle = math.inf, oracle + len(x0)
        rows[j] = {"real_accuracy": real_right / total, "fake_accuracy": fake_right / total,
                   "mean_abs_difference_over_std": ratio / total if math.isfinite(ratio) else None,
                   "oracle_accuracy": oracle / total, "posterior_std": method.schedule.posterior_terms(j)[1]}
    critic.train()
    return rows


def train_critic(method: SynDiffMethod, critic: torch.nn.Module, lr: float, data: PairedSliceDataset,
                 held_out: list[dict[str, torch.Tensor]], steps: int, batch: int, every: int, seed: int,
                 log: Any) -> list[dict[str, Any]]:
    """The critic alone against the frozen generator, with SynDiff's own loss (softplus + R1)."""
    seed_everything(seed)
    optimiser = adamw(critic.parameters(), {**method.config, "lr": lr})
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
    history = [{"step": 0, "seconds": 0.0, "loss": None, "per_step": evaluate(method, critic, held_out, seed)}]
    start, step, losses = time.perf_counter(), 0, []
    while step < steps:
        for batch_ in loader:
            with torch.no_grad():
                reverse = method._reverse_step(method.generator, batch_["target"], batch_["source"], generator)
            loss, _ = method._critic_loss(critic, reverse, penalise=True)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % every == 0 or step == steps:
                row = {"step": step, "seconds": time.perf_counter() - start,
                       "loss": sum(losses[-every:]) / len(losses[-every:]),
                       "per_step": evaluate(method, critic, held_out, seed)}
                history.append(row)
                log(f"lr {lr:g} step {step}: loss {row['loss']:.4f}, j=1 accuracy "
                    f"{row['per_step'][1]['real_accuracy']:.2f}/{row['per_step'][1]['fake_accuracy']:.2f}")
            if step == steps:
                break
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained syndiff run folder")
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest it was trained on")
    parser.add_argument("--cache", type=Path, required=True, help="prepared cases (the benchmark's OUT/cache)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--r1-weight", type=float, default=None, help="the critics' R1 weight (default: the run's)")
    parser.add_argument("--fresh-only", action="store_true", help="skip continuing the run's own critic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = load_model(args.run, "cpu")
    method = model.method
    if not isinstance(method, SynDiffMethod):
        raise SystemExit(f"{args.run}: a {method.name} run, not a syndiff one")
    method.generator.eval().requires_grad_(False)
    if args.r1_weight is not None:
        method.config["r1_weight"] = args.r1_weight
    train, validation, train_ids, val_ids = datasets(args.run, args.manifest, args.cache)
    held_out = held_out_batches(validation, args.batch, args.eval_batches, args.seed)
    probes = []
    own = float(method.config["discriminator_lr"])
    candidates = [] if args.fresh_only else [("the run's own critic, continued", method.discriminator, own)]
    for lr in args.lr:
        seed_everything(args.seed)
        candidates.append((f"a fresh critic at lr {lr:g}", method._critic(method.data.target_channels), lr))
    for label, critic, lr in candidates:
        critic.requires_grad_(True).train()
        history = train_critic(method, critic, lr, train, held_out, args.steps, args.batch, args.eval_every,
                               args.seed, print)
        probes.append({"critic": label, "lr": lr, "history": history})
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "run": str(args.run),
              "trained_steps": model.step, "train_cases": train_ids, "held_out_cases": val_ids,
              "config": method.config, "args": {k: str(v) for k, v in vars(args).items()}, "probes": probes}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "probe.json", report)
    write_text(args.out / "probe.md", markdown(report))
    print(f"wrote {args.out / 'probe.md'}")


def markdown(report: dict[str, Any]) -> str:
    first = report["probes"][0]["history"][0]["per_step"]
    lines = [
        "# Can a critic tell SynDiff's generated reverse steps from true ones?", "",
        f"Measured {report['date']} by `python benchmarks/syndiff_critic_probe.py` on the run `{report['run']}` "
        f"(trained {report['trained_steps']} steps; critic `{report['config']['critic']}`, "
        f"channels {report['config']['discriminator_channels']}, R1 weight {report['config']['r1_weight']:g}). "
        "Critics trained alone against its frozen EMA "
        f"generator on the training patients ({', '.join(report['train_cases'])}); accuracy on "
        f"{report['args']['eval_batches']} fixed batches of {report['args']['batch']} patches of the held-out "
        f"validation patient ({', '.join(report['held_out_cases'])}). 0.5 is chance.", "",
        "## What separates them in principle (the oracle knows the true x0)", "",
        "| j (reverse step) | posterior std | mean abs mean difference / std | oracle accuracy per image |",
        "|---|---|---|---|",
    ]
    for j, row in first.items():
        ratio = "no noise" if row["mean_abs_difference_over_std"] is None else f"{row['mean_abs_difference_over_std']:.3f}"
        lines.append(f"| {j} | {row['posterior_std']:.3f} | {ratio} | {row['oracle_accuracy']:.3f} |")
    lines += ["", "## Critics trained alone", "",
              "Held-out accuracy on true / on generated x_{t-k} (their mean: 0.5 is chance, whatever the critic's "
              "bias), per reverse step j; loss: SynDiff's critic loss (softplus, 2 ln 2 = 1.386 at chance, plus R1) over "
              "the last steps.", ""]
    steps = list(first)
    header = ["critic", "step", "loss", *(f"j={j}" for j in steps), "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for probe in report["probes"]:
        for row in probe["history"]:
            cells = [f"{row['per_step'][j]['real_accuracy']:.2f} / {row['per_step'][j]['fake_accuracy']:.2f} "
                     f"({(row['per_step'][j]['real_accuracy'] + row['per_step'][j]['fake_accuracy']) / 2:.2f})" for j in steps]
            loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
            lines.append(f"| {probe['critic']} | {row['step']} | {loss} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
