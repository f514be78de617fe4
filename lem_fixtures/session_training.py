"""Training in a pytest session: the LoRA adapter of each NAME+lek model and the self-distilled data it may train on.

A `SessionTraining` belongs to one LemSession. It reads the session's --lem-training-* and
--lem-distill-* options, keeps each adapter and each distillation for the rest of the session,
and leaves the caching across sessions and pytest-xdist workers to training.ensure_adapter and
distill.distilled_data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LemError, TrainingConfigError, TrainingDataError

if TYPE_CHECKING:
    from .session import LemSession

logger = logging.getLogger(__name__)


class SessionTraining:
    """The adapters and self-distilled data of one session."""

    def __init__(self, session: LemSession) -> None:
        self.session = session
        self.adapters: dict[str, Any] = {}
        self.distillations: dict[tuple, Any] = {}

    def option(self, name: str) -> Any:
        return self.session.option(name)

    def option_problems(self) -> list[str]:
        """Return why the training and distillation options cannot work together; LemSession.check_options raises them."""
        problems = []
        k = self.option("--lem-distill-k")
        temperature = self.option("--lem-distill-temperature")
        if k > 1 and temperature <= 0:
            problems.append(
                f"--lem-distill-k {k} needs --lem-distill-temperature above 0, got {temperature}; "
                "greedy samples of one probe are all the same"
            )
        if self.option("--lem-distill") and self.option("--lem-training-split") != "train":
            problems.append(
                "--lem-training-split applies to --lem-training-data; with --lem-distill the model trains on the "
                "distilled train.jsonl, so drop one of the two options"
            )
        return problems

    def adapter(self, base: str):
        """Return the session's LoRA adapter for a base model (training.CachedAdapter), training it on first use.

        It trains on --lem-training-data, or with --lem-distill on data self-distilled from the
        base model itself, with the config of --lem-training-config. The config is read before
        any distillation, so a bad config fails at once.
        """
        if base in self.adapters:
            return self.adapters[base]

        from .training import ensure_adapter, load_training_config

        config_path = self.config_path()
        config = load_training_config(config_path)
        distilling = bool(self.option("--lem-distill"))
        if distilling and len(config.phases) > 1 and all(phase.data is not None for phase in config.phases):
            raise TrainingConfigError(
                f"{config_path}: every phase names its own data, so no phase would train on the self-distilled data of "
                "--lem-distill; remove 'data' from the phase that should train on it"
            )

        if distilling:
            data_dir, split = self.distilled(base).data_dir, "train"
        else:
            data_dir, split = self.session.path_option("--lem-training-data", "training/data"), self.option("--lem-training-split")
        self.session.progress(f"LoRA adapter for {base}: config {config_path}, data {data_dir} ({split} split)")
        try:
            adapter = ensure_adapter(base, data_dir, config_path, train_split=split)
        except TrainingDataError as error:
            if not distilling:
                raise
            raise TrainingDataError(
                f"{error}\nThe data was self-distilled from {base}: keep more samples with a lower "
                "--lem-distill-threshold, a larger --lem-distill-k or more --lem-distill-probes"
            ) from error
        status = "trained" if adapter.trained else "reused from the cache"
        self.session.progress(f"LoRA adapter {adapter.key[:16]} for {base} {status}: {adapter.path}")
        self.adapters[base] = adapter
        return adapter

    def config_path(self) -> Path:
        """The LoRA config: --lem-training-config, else training/lora.yaml of the project, else the suite's own paper config."""
        from .training import DEFAULT_CONFIG

        path = self.session.path_option("--lem-training-config", "training/lora.yaml")
        if not self.option("--lem-training-config") and not path.is_file() and DEFAULT_CONFIG.is_file():
            logger.info("%s not found; using the suite's paper config %s", path, DEFAULT_CONFIG)
            return DEFAULT_CONFIG
        return path

    def distill_settings(self) -> dict[str, Any]:
        """The self-distillation options of this session, with defaults filled in."""
        max_tokens = self.option("--lem-distill-max-tokens")
        return {
            "k": self.option("--lem-distill-k"),
            "threshold": self.option("--lem-distill-threshold"),
            "max_tokens": self.option("--lem-max-tokens") if max_tokens is None else max_tokens,
            "temperature": self.option("--lem-distill-temperature"),
            "top_p": self.option("--lem-top-p"),
            "seed": self.option("--lem-seed"),
            "drop_truncated": bool(self.option("--lem-distill-drop-truncated")),
        }

    def distill_probes(self, paths: Sequence[str | Path] | None = None) -> list[Any]:
        """The probes to distill from: `paths`, else --lem-distill-probes, else the probes of the session's matrix."""
        from .probes import load_probes

        paths = list(paths) if paths is not None else list(self.option("--lem-distill-probes"))
        if not paths:
            return list(self.session.matrix().probes)
        return load_probes([self.session.resolve(value) for value in paths], duplicate_ids=self.option("--lem-duplicate-ids"))

    def distill_kernel(self, name: str | None = None) -> Any:
        """The kernel condition that distillation samples under: `name`, else --lem-distill-kernel, else the matrix's first kernel."""
        kernels = self.session.matrix().kernels
        option = "kernel" if name is not None else "--lem-distill-kernel"
        name = name if name is not None else self.option("--lem-distill-kernel")
        if name is None:
            if not kernels:
                raise LemError("self-distillation needs a kernel condition; pass --lem-kernel NAME=PATH")
            return kernels[0]
        for kernel in kernels:
            if kernel.name == name:
                return kernel
        known = ", ".join(kernel.name for kernel in kernels) or "none"
        raise LemError(f"{option} {name}: no such kernel condition; the session has: {known}")

    def distilled(self, base: str, **overrides: Any):
        """Return self-distilled training data from `base` (distill.DistillResult), from the cache when it has it.

        Keyword overrides replace the session's options: kernel (a condition name or a Kernel),
        probes (a path, a list of paths, or a list of Probe objects), k, threshold, max_tokens,
        temperature, top_p, seed and drop_truncated.
        """
        from .distill import check_settings, distilled_data
        from .generation import GenerationParams

        settings = self.distill_settings()
        kernel = overrides.pop("kernel", None)
        if not hasattr(kernel, "text"):
            kernel = self.distill_kernel(kernel)
        probes = overrides.pop("probes", None)
        own_probes = probes is None and not self.option("--lem-distill-probes")
        if isinstance(probes, (str, Path)):
            probes = [probes]
        if probes is None or not all(hasattr(probe, "prompt") for probe in probes):
            probes = self.distill_probes(probes)
        values = {key: overrides.pop(key, default) for key, default in settings.items()}
        if overrides:
            raise TypeError(f"unknown distillation setting(s): {', '.join(sorted(overrides))}; known: kernel, probes, {', '.join(settings)}")

        key = (base, kernel.name, kernel.sha256, tuple((probe.id, probe.prompt) for probe in probes), tuple(sorted(values.items())))
        if key in self.distillations:
            return self.distillations[key]

        try:
            params = GenerationParams(
                max_tokens=values["max_tokens"], temperature=values["temperature"], top_p=values["top_p"], seed=values["seed"],
            )
            check_settings(values["k"], params)
        except ValueError as error:
            raise LemError(f"self-distillation settings: {error}") from None
        if own_probes:
            self.session.progress(
                "self-distillation uses the benchmark's own probes, so the trained model's scores on them are in-sample; "
                "pass --lem-distill-probes for held-out probes"
            )
        self.session.progress(
            f"self-distillation from {base}: {len(probes)} probes x {values['k']} samples under {kernel.name}, "
            f"keeping v2 scores >= {values['threshold']}"
        )
        result = distilled_data(
            base, probes, kernel, k=values["k"], threshold=values["threshold"], params=params,
            batch_size=self.session.batch_size(), drop_truncated=values["drop_truncated"],
        )
        source = " (samples from the cache)" if result.reused else ""
        self.session.progress(
            f"self-distillation kept {result.n_kept} of {result.n_samples} samples (keep rate {result.keep_rate:.2f}; "
            f"{result.n_truncated} reached the token limit) in {result.data_dir}{source}"
        )
        self.distillations[key] = result
        return result
