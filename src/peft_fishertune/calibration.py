"""The DR-FIM calibration pass: Fisher information on clean and domain-shifted batches, via Accelerate.

    from peft_fishertune import calibrate
    scores = calibrate(model, train_dataloader, steps=2000)
    model.base_model.select(scores)
    scores.save("dr_fim.safetensors")

Conventions (our choices; see the README):
- Loss scale: the loss as the model returns it (``outputs.loss``, for segmentation the mean over
  labelled pixels and the batch) or as ``loss_fn(model, batch)`` returns it. One calibration step takes
  one batch per process (``gradient_accumulation_steps`` micro-batches when accumulating: their mean
  gradient is one sample). F = mean over steps of g^2, g the gradient of that loss. Scaling the loss by
  c scales F by c^2. The ranking score divides each term by its global mean (``drfim.combine``), and the
  domain term reads F in the config's ``fisher_scale`` (by default in units of the median F, so that the
  fixed gamma * tau^-2 of Eq. 15's denominator sits at the same place in F's distribution whatever the
  loss reduction, image size or batch size; see ``drfim.fisher_unit``).
- The model runs in eval mode (no dropout), so scores are a deterministic function of data and seed.
- ``steps`` counts steps per process; with P processes a step covers P batches, split by Accelerate.
  Per-process sums are reduced once, at the end, so P processes on a split of the data give the
  one-process result on the same data. The variational estimator learns per process; its precisions
  are averaged across processes.
- The shift weight w of Eq. 14/15 is drawn per batch; the scores use its mean over the used batches.
- A step whose loss or gradients are not finite is skipped and counted; under fp16 a skip also halves
  the loss scale (starting at 2^10). More than half skipped raises.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .layer import FisherTuneLayer
from .perturbation import DomainShift
from .scores import Scores

LossFn = Callable[[nn.Module, object], torch.Tensor]
KINDS = ("clean", "shifted")
PEFT_PREFIX = "base_model.model."


def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    steps: int | None = None,
    *,
    accelerator=None,
    loss_fn: LossFn | None = None,
    adapter_name: str | None = None,
    estimator: str | None = None,
    variational_lr: float = 0.01,
    input_key: str = "pixel_values",
    progress: bool = True,
) -> Scores:
    """Estimate F(x), F(x') and the DR-FIM score of every candidate weight of a FisherTune model.

    Args:
        model: a ``PeftModel`` with a FisherTune adapter, its ``FisherTuneModel``, or a model with
            FisherTune layers injected. Hyper-parameters (gamma, tau, lam, eps, estimator, perturbation
            site and strength, seed, calibration_steps) come from the adapter's config.
        dataloader: batches for ``loss_fn``; by default dicts that the model takes as keyword arguments
            and that make it return ``.loss`` (labels included). Cycled when shorter than ``steps``.
        steps: calibration steps (per process); the config's ``calibration_steps`` by default.
        accelerator: an ``accelerate.Accelerator``; when None one is made (with ``cpu=True`` on a machine
            without CUDA, so that ``torchrun`` processes there form one group).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; by default ``model(**batch).loss``.
        adapter_name: the FisherTune adapter whose candidates are scored; the active one by default.
        estimator: ``"closed_form"`` or ``"variational"``; the config's by default.
        variational_lr: Adam step size on log sigma for the variational estimator.
        input_key: the batch key holding the pixels, for the pixel-level shift.
        progress: show a progress bar on the main process.
    """
    accelerator = accelerator or _default_accelerator()
    root, config, names, weights = _candidates(accelerator.unwrap_model(model), adapter_name)
    steps = config.calibration_steps if steps is None else steps
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    estimator = estimator or config.estimator
    if estimator not in ("closed_form", "variational"):
        raise ValueError(f"estimator must be 'closed_form' or 'variational', got {estimator!r}")
    loader = _prepared(accelerator, dataloader)
    loss_fn = loss_fn or _model_loss
    shift = DomainShift(config.perturb_strength, config.seed)
    state = _ClosedForm(weights) if estimator == "closed_form" else _Variational(weights, config, variational_lr)
    grads = _GradientTaker(accelerator, weights)

    with _calibration_mode(root, weights):
        batches = _cycle(loader)
        bar = tqdm(total=steps, desc="DR-FIM calibration", disable=not (progress and accelerator.is_main_process))
        used = skipped = 0
        weight_sum = 0.0
        try:
            for step in range(steps):
                micro = [next(batches) for _ in range(accelerator.gradient_accumulation_steps)]
                batch_index = step * accelerator.num_processes + accelerator.process_index
                draw = shift.draw(batch_index)
                state.prepare(batch_index, shifted=False)
                clean = grads(lambda batch: loss_fn(root, batch), micro)
                state.prepare(batch_index, shifted=True)
                with shift.applied(root, config.perturb_module, draw, input_key):
                    shifted = grads(lambda batch: loss_fn(root, batch), micro)
                if clean is None or shifted is None:
                    skipped += 1
                else:
                    state.update(clean, shifted, step, steps)
                    used += 1
                    weight_sum += draw.weight
                bar.update(1)
                bar.set_postfix(skipped=skipped)
        finally:
            state.restore()
            bar.close()

    totals = accelerator.reduce(
        torch.tensor([used, skipped, weight_sum], dtype=torch.float64, device=accelerator.device), "sum"
    )
    used, skipped, weight_sum = int(totals[0]), int(totals[1]), float(totals[2])
    if 2 * skipped > used + skipped:
        raise RuntimeError(f"calibration skipped {skipped} of {used + skipped} steps (non-finite loss or gradients)")
    fisher, fisher_shifted = state.fishers(accelerator, used)
    meta = {
        "estimator": estimator,
        "steps": steps,
        "used": used,
        "skipped": skipped,
        "seed": config.seed,
        "perturb_module": config.perturb_module,
        "perturb_strength": config.perturb_strength,
        "processes": accelerator.num_processes,
    }
    return Scores.from_fisher(
        dict(zip(names, fisher)),
        dict(zip(names, fisher_shifted)),
        weight_sum / used,
        gamma=config.gamma,
        tau=config.tau,
        lam=config.lam,
        eps=config.eps,
        fisher_scale=config.fisher_scale,
        meta=meta,
    )


def _default_accelerator():
    """The process's Accelerate state when one exists (e.g. a Trainer's), else a new one.

    A new one gets cpu=True on a machine without CUDA: otherwise Accelerate treats every torchrun process
    there as a lone process.
    """
    from accelerate import Accelerator, PartialState

    if PartialState._shared_state:
        return Accelerator()
    return Accelerator(cpu=not torch.cuda.is_available())


def _model_loss(model: nn.Module, batch) -> torch.Tensor:
    if not isinstance(batch, dict):
        raise TypeError(f"batches of type {type(batch).__name__} need a loss_fn(model, batch)")
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss; include the labels in the batch or pass a loss_fn")
    return loss


def _candidates(model: nn.Module, adapter_name: str | None):
    """(module to run, adapter config, candidate names, candidate weights) of a FisherTune model."""
    from peft import PeftModel

    from .model import FisherTuneModel

    tuner = model.base_model if isinstance(model, PeftModel) else model
    root = tuner.model if isinstance(tuner, FisherTuneModel) else model
    configs = getattr(root, "peft_config", None) or getattr(model, "peft_config", {})
    adapter_name = adapter_name or next(iter(configs), None)
    if adapter_name not in configs:
        raise ValueError(f"no FisherTune adapter {adapter_name!r} in the model (adapters: {sorted(configs)})")
    layers = [
        (name.removeprefix(PEFT_PREFIX), module)
        for name, module in root.named_modules()
        if isinstance(module, FisherTuneLayer) and adapter_name in module.fishertune_values
    ]
    if not layers:
        raise ValueError(f"the model has no FisherTune layers for adapter {adapter_name!r}")
    names = [name for name, _ in layers]
    weights = [module.get_base_layer().weight for _, module in layers]
    return root, configs[adapter_name], names, weights


def _prepared(accelerator, dataloader):
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    if isinstance(dataloader, (DataLoaderShard, DataLoaderDispatcher)):
        return dataloader
    if isinstance(dataloader, torch.utils.data.DataLoader):
        return accelerator.prepare_data_loader(dataloader)
    return dataloader


def _cycle(loader):
    """Batches forever, epoch after epoch; raise on an empty dataloader."""
    for epoch in itertools.count():
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the calibration dataloader is empty")
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch + 1)


@contextlib.contextmanager
def _calibration_mode(root: nn.Module, weights: list[torch.Tensor]):
    """Only the candidate weights require grad and the model is in eval mode; both restored on exit."""
    flags = {p: p.requires_grad for p in root.parameters()}
    training = root.training
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        root.eval()
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        root.train(training)


class _GradientTaker:
    """Gradients of the mean micro-batch loss w.r.t. the candidates, or None when not finite."""

    def __init__(self, accelerator, weights: list[torch.Tensor]):
        self.accelerator = accelerator
        self.weights = weights
        self.scale = 2.0**10 if accelerator.mixed_precision == "fp16" else 1.0

    def __call__(self, compute_loss, micro_batches) -> list[torch.Tensor | None] | None:
        total: list[torch.Tensor | None] = [None] * len(self.weights)
        for batch in micro_batches:
            with self.accelerator.autocast():
                loss = compute_loss(batch)
            if not torch.isfinite(loss.detach()).item():
                return None
            scaled = loss.float() * (self.scale / len(micro_batches))
            grads = torch.autograd.grad(scaled, self.weights, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    total[i] = g.float() if total[i] is None else total[i].add_(g)
        for g in total:
            if g is None:
                continue
            g.div_(self.scale)
            if not torch.isfinite(g).all():
                if self.scale > 1:
                    self.scale /= 2
                return None
        return total


class _ClosedForm:
    """Sums of g^2 on clean and shifted batches: F = mean g^2, so Lambda = F / gamma + tau^-2 (Eq. 12)."""

    def __init__(self, weights):
        self.sums = [torch.zeros_like(w, dtype=_acc_dtype(w)) for w in weights]
        self.sums_shifted = [torch.zeros_like(w, dtype=_acc_dtype(w)) for w in weights]

    def prepare(self, batch_index: int, shifted: bool) -> None:
        """The closed form takes gradients at the current weights."""

    def update(self, clean, shifted, step, steps) -> None:
        for acc, g in zip(self.sums, clean):
            if g is not None:
                acc.addcmul_(g, g)
        for acc, g in zip(self.sums_shifted, shifted):
            if g is not None:
                acc.addcmul_(g, g)

    def restore(self) -> None:
        """Nothing was changed."""

    def fishers(self, accelerator, used: int):
        """F = (sum over all processes of g^2) / (steps used by all processes)."""

        def reduce(sums):
            return [accelerator.reduce(s, "sum") / max(used, 1) for s in sums]

        return reduce(self.sums), reduce(self.sums_shifted)


class _Variational:
    """Per-weight posterior scale learned by the reparameterisation trick, once on x, once on x' (Eq. 7-13).

    theta = theta_hat + sigma * e with e ~ N(0, 1). The gradient of E_q[L] + gamma * KL(q || p) w.r.t.
    sigma is e * dL/dtheta + gamma * (sigma / tau^2 - 1 / sigma) (no extra backward pass). We write the
    precision as Lambda = sigma^-2 = tau^-2 + exp(rho) and learn rho with Adam: then F = gamma * exp(rho)
    (Eq. 13) never suffers the float32 cancellation of Lambda - tau^-2, the KL part of the gradient is
    exactly -gamma * sigma * exp(rho), and the stationary point is gamma * Lambda = F + gamma * tau^-2
    (Eq. 12). rho starts at the closed-form value of the first step. F is the mean of gamma * exp(rho)
    over the second half of the steps, which averages out the step noise. The weights are restored bit
    for bit from a copy at the end.
    """

    def __init__(self, weights, config, lr: float):
        self.weights = weights
        self.gamma, self.tau, self.seed, self.lr = config.gamma, config.tau, config.seed, lr
        self.originals = [w.detach().clone() for w in weights]
        self.rho: dict[str, list[torch.Tensor]] = {}
        self.sigma: dict[str, list[torch.Tensor]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.averages = {kind: [torch.zeros_like(w, dtype=_acc_dtype(w)) for w in weights] for kind in KINDS}
        self.averaged = 0
        self.noise: dict[str, list[torch.Tensor]] = {}

    def _sigma(self, rho: torch.Tensor) -> torch.Tensor:
        return rho.exp().add_(self.tau**-2).rsqrt_()

    def prepare(self, batch_index: int, shifted: bool) -> None:
        kind = KINDS[int(shifted)]
        noise = []
        for i, (w, original) in enumerate(zip(self.weights, self.originals)):
            generator = torch.Generator(device=w.device)
            generator.manual_seed(self.seed * 1_000_003 + (2 * batch_index + int(shifted)) * 4099 + i)
            e = torch.randn(w.shape, generator=generator, dtype=_acc_dtype(w), device=w.device)
            sigma = self.sigma[kind][i] if kind in self.sigma else self.tau
            with torch.no_grad():
                w.copy_(original).add_((e * sigma).to(w.dtype))
            noise.append(e)
        self.noise[kind] = noise

    def update(self, clean, shifted, step, steps) -> None:
        for kind, grads in zip(KINDS, (clean, shifted)):
            if kind not in self.rho:  # first step: start at the closed-form estimate g^2 / gamma
                self.rho[kind] = [
                    ((g.square() if g is not None else torch.zeros_like(w, dtype=_acc_dtype(w))) / self.gamma)
                    .clamp_min(1e-30)
                    .log()
                    .to(_acc_dtype(w))
                    for g, w in zip(grads, self.weights)
                ]
                self.optimizers[kind] = torch.optim.Adam(self.rho[kind], lr=self.lr)
            else:
                for rho, sigma, e, g in zip(self.rho[kind], self.sigma[kind], self.noise[kind], grads):
                    exp_rho = rho.exp()
                    # dObjective/dsigma = e * g - gamma * sigma * exp(rho); dsigma/drho = -sigma^3 * exp(rho) / 2
                    grad = e.mul_(g) if g is not None else e.zero_()
                    grad.sub_(self.gamma * sigma * exp_rho).mul_(sigma.pow(3).mul_(exp_rho).mul_(-0.5))
                    rho.grad = grad
                self.optimizers[kind].step()
            self.sigma[kind] = [self._sigma(rho) for rho in self.rho[kind]]
        self.noise = {}
        if step >= steps // 2:
            self.averaged += 1
            for kind in KINDS:
                for avg, rho in zip(self.averages[kind], self.rho[kind]):
                    avg.add_(rho.exp())

    def restore(self) -> None:
        with torch.no_grad():
            for w, original in zip(self.weights, self.originals):
                w.copy_(original)

    def fishers(self, accelerator, used: int):
        """F = gamma * exp(rho), averaged over the second half of the steps and over processes."""

        def reduce(kind):
            if self.averaged:
                local = [avg / self.averaged for avg in self.averages[kind]]
            else:
                local = [rho.exp() for rho in self.rho.get(kind, [torch.zeros_like(a) for a in self.averages[kind]])]
            return [self.gamma * accelerator.reduce(x, "mean") for x in local]

        return reduce("clean"), reduce("shifted")


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32
