"""The config of an editing/unlearning experiment (``mechunlearn run CONFIG``), validated by pydantic.

One experiment = one fact set, one kind of edit, several localizations compared at equal
parameter budget, several seeds, hyper-parameters chosen per localization on a validation
split, and the robustness battery. Unknown keys anywhere are errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from mechunlearn.attacks.relearn import RelearnConfig
from mechunlearn.attacks.soft_prompt import SoftPromptConfig
from mechunlearn.edit.engine import OPTIM_FIELDS, with_changes
from mechunlearn.edit.latent_adversary import LatentAdversaryConfig
from mechunlearn.edit.objectives import check_objective_options
from mechunlearn.edit.trainer import TrainConfig
from mechunlearn.experiments.config import (
    Seeds,
    TaskName,
    registered_measurements,
    registered_name,
)
from mechunlearn.experiments.method_options import MethodOptionsMap, move_legacy_options
from mechunlearn.localize import LOCALIZERS, LocalizeOptions
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.formats import FORMATS


class Strict(BaseModel):
    model_config = STRICT_CONFIG


class ForgetMatch(Strict):
    """Calibrate a row's learning rate so that it forgets as much as another row on the
    validation facts, before the two are compared (issue 18). A LAT twin at its row's learning
    rate may hardly unlearn (its loss is computed under an adversary that restores the
    answer); then whether LAT resists relearning cannot be asked. Matched, both rows start the
    robustness battery having forgotten the same share of validation facts.

    The target is ``row``'s validation forget effect (``1 - accuracy``, completion format; edit
    success when editing) after its full training at its chosen hyper-parameters. Each ``lr``
    is trained for the same steps on the same validation facts, then ``refine`` bisection
    tries (geometric mean) between the two learning rates that bracket the target; the one
    closest to it is chosen (ties: the smaller learning rate)."""

    row: str = Field(description="the row whose validation forgetting is matched")
    lr: list[float] | None = Field(
        default=None, description="learning rates tried (default: the sweep's grid)"
    )
    refine: int = Field(2, ge=0, description="bisection tries after the grid")

    @field_validator("lr")
    @classmethod
    def _positive_distinct(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (
            len(value) < 2 or any(v <= 0 for v in value) or len(set(value)) != len(value)
        ):
            raise ValueError("lr needs at least two distinct values, all > 0")
        return value


class LocalizationSpec(Strict):
    """One row of the comparison: a localization method and how its weights are trained.

    ``objective`` / ``objective_options`` replace the experiment's ``train`` ones for this row
    (e.g. gradient ascent or RMU rows beside localized rows); ``latent_adversary`` trains the
    row's forget term under targeted LAT (``edit.lat.ForgetLat``, Sheshadri et al. 2024).
    """

    name: str = Field(description="label in tables and file names")
    method: Annotated[str, registered_name(LOCALIZERS)]
    restrict_to: Literal["all", "mlp", "attn"] = "all"
    from_file: str | None = Field(
        default=None, description="reuse this localization.json instead of computing it"
    )
    trainer: Literal["localized", "lora"] = "localized"
    objective: str | None = Field(default=None, description="default: train.objective")
    objective_options: dict[str, Any] | None = Field(
        default=None, description="default: train.objective_options"
    )
    latent_adversary: LatentAdversaryConfig | None = Field(
        default=None, description="targeted LAT on the forget term (a per-step latent adversary)"
    )
    train: dict[str, Any] | None = Field(
        default=None,
        description="fields of the experiment's train block replaced for this row (e.g. "
        "{steps: 60} for a shallow control that needs a longer edit); its sweep trains as long",
    )
    hyperparameters_from: str | None = Field(
        default=None,
        description="train with the learning rate and forget coefficient chosen for this other "
        "row (no sweep of its own), so twins (a row and its LAT variant) differ only in the "
        "adversary",
    )
    match_forgetting: ForgetMatch | None = Field(
        default=None,
        description="choose this row's learning rate so that it forgets as much as another row "
        "on the validation facts (no sweep of its own); it is paired with that row in the report",
    )

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The experiment's ``train`` block with this row's objective and ``train`` fields
        (validated)."""
        update: dict[str, Any] = dict(self.train or {})
        if self.objective is not None:
            update["objective"] = self.objective
            update["objective_options"] = {}
        if self.objective_options is not None:
            update["objective_options"] = self.objective_options
        return with_changes(base, **update)

    @field_validator("train")
    @classmethod
    def _known_train_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        known = set(TrainConfig.model_fields) | set(OPTIM_FIELDS)
        unknown = sorted(set(value or {}) - known)
        if unknown:
            raise ValueError(f"unknown train field(s) {unknown}; known: {sorted(known)}")
        chosen = sorted({"lr", "forget_coef", "seed"} & set(value or {}))
        if chosen:
            raise ValueError(
                f"train field(s) {chosen} cannot be set per row: the sweep or `hyperparameters` "
                "choose lr and forget_coef, and the seed is the experiment's"
            )
        return value

    @field_validator("name")
    @classmethod
    def _file_safe(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"name {value!r} must be letters, digits, '-' or '_'")
        return value


def default_localizations() -> list[LocalizationSpec]:
    """Mechanistic Unlearning's comparison (Guo et al. 2024, Table 1 rows)."""
    return [
        LocalizationSpec(name="fact_lookup", method="fact_lookup"),
        LocalizationSpec(name="causal_tracing", method="causal_tracing"),
        LocalizationSpec(name="attribution_patching", method="attribution_patching"),
        LocalizationSpec(name="causal_tracing_mlps", method="causal_tracing", restrict_to="mlp"),
        LocalizationSpec(name="random", method="random"),
        LocalizationSpec(name="all_mlps", method="all_mlps"),
        LocalizationSpec(name="nonlocalized", method="nonlocalized"),
    ]


class FactSelection(Strict):
    """Which known facts are edited, retained, held out for validation and localized on.

    Validation facts are carved out first (the same for every seed); each seed then draws its
    own forget and retain sets from the rest, so seeds vary the facts as well as the training.
    """

    n_forget: int | None = Field(default=16, ge=1, description="random known facts to edit")
    forget_group: str | None = Field(
        default=None, description="edit every known fact with this answer (e.g. a sport)"
    )
    max_forget: int | None = Field(default=None, ge=1, description="cap on a group's size")
    n_validation: int = Field(default=16, ge=1, description="forget facts for the sweep")
    n_validation_retain: int = Field(default=32, ge=1)
    n_retain_train: int = Field(default=64, ge=1, description="facts in the maintain term")
    n_retain_eval: int = Field(default=64, ge=1, description="held-out facts for side effects")
    n_localize: int = Field(default=32, ge=2, description="known facts to localize on")
    known_threshold: float = Field(default=0.5, ge=0, le=1)
    known_only: bool = True

    @model_validator(mode="after")
    def _one_forget_rule(self) -> FactSelection:
        if self.forget_group is not None:
            self.n_forget = None
        if self.n_forget is None and self.forget_group is None:
            raise ValueError("give n_forget (random facts) or forget_group (e.g. a sport)")
        return self


class EditTarget(Strict):
    """The new answer of each edited fact (ignored when unlearning)."""

    kind: Literal["other_option", "fixed", "dataset"] = Field(
        default="other_option",
        description="other_option: a different option drawn per fact; fixed: `value` for every "
        "fact (added to every fact's options); dataset: the record's new_answer (CounterFact)",
    )
    value: str | None = None

    @model_validator(mode="after")
    def _value_when_fixed(self) -> EditTarget:
        if self.kind == "fixed" and not (self.value and self.value.strip()):
            raise ValueError("target.kind 'fixed' needs a non-empty target.value")
        return self


class SweepConfig(Strict):
    """Per-localization grid over learning rate and forget coefficient, on the validation split."""

    lr: list[float] = Field(default_factory=lambda: [1e-4, 3e-4])
    forget_coef: list[float] = Field(default_factory=lambda: [1.0])
    steps: int | None = Field(default=None, ge=1, description="default: train.steps")
    seed: int = 0
    selection: Literal["full", "halving"] = Field(
        default="full",
        description="full: train every point for every step; halving: successive halving over "
        "early-stopped runs (experiments.sweep.sweep_rungs)",
    )
    eta: int = Field(default=3, ge=2, description="halving: keep 1/eta of the points per rung")
    rung_fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="halving: the last rung trains this fraction of the steps, each earlier rung "
        "this fraction of the next (default 1/eta)",
    )
    rung_steps: list[int] | None = Field(
        default=None,
        description="halving: the steps each rung reaches (increasing), instead of ceil(log_eta "
        "n) rungs from rung_fraction; a rung's survivors resume from their checkpoint (trained "
        "weights and AdamW state, on disk in the run folder until the sweep is done)",
    )

    @field_validator("rung_steps")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (
            not value or value[0] < 1 or any(b <= a for a, b in zip(value, value[1:], strict=False))
        ):
            raise ValueError(f"rung_steps must be increasing positive step counts, got {value}")
        return value

    @field_validator("lr", "forget_coef")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("needs at least one value, all > 0")
        return value


class Hyperparameters(Strict):
    lr: float = Field(gt=0)
    forget_coef: float = Field(gt=0)


class RelocalizeConfig(Strict):
    """Localize again after the edit (``relocalize`` battery part): each method run on the
    edited model for (a pairable subset of) the forget facts with their ORIGINAL answers, so the
    report can say whether the components found before the edit still carry the old answer."""

    methods: list[Annotated[str, registered_name(LOCALIZERS)]] = Field(
        default_factory=lambda: ["fact_lookup", "causal_tracing"]
    )
    n_facts: int = Field(16, ge=2, description="forget facts localized on (drawn in pairs)")


DEDICATED = {
    "formats": "formats",
    "counterfact": "counterfact_side_effects",
    "probes": "probes",
    "relocalize": "relocalize",
    "relearn": "relearn (and relearn_variants)",
    "soft_prompt": "soft_prompt",
}
"""The battery's measurements set by fields of their own (measurement -> field), which keep
every earlier config meaning what it meant."""


class BatteryConfig(Strict):
    """The robustness battery run after every edit."""

    formats: list[str] = Field(
        default_factory=lambda: [
            "completion",
            "question",
            "paraphrase",
            "mcq",
            "options_word",
            "capitalized",
            "dashed",
        ]  # fmt: skip
    )
    format_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"mcq": {"option_order": "shuffle"}}
    )
    batch_size: int = Field(default=16, ge=1)
    relearn: RelearnConfig | None = Field(default_factory=RelearnConfig)
    relearn_variants: dict[str, RelearnConfig] = Field(
        default_factory=dict,
        description="more relearning attacks by name, each its own battery part "
        "(`relearn@<name>`), e.g. the paper's rank-512 attack or a strength curve",
    )
    soft_prompt: SoftPromptConfig | None = Field(default_factory=SoftPromptConfig)
    relocalize: RelocalizeConfig | None = Field(
        default=None, description="localize again on the edited model (and the base model)"
    )
    probes: bool = True
    probe_position: Literal["last_subject", "final"] = "last_subject"
    lm_texts: int = Field(default=64, ge=1, description="general sentences for the LM loss")
    counterfact_side_effects: str | None = Field(
        default=None,
        description="CounterFact JSON: ROME neighbourhood score on its facts (unrelated knowledge)",
    )
    n_counterfact_side_effects: int = Field(default=64, ge=1)
    measurements: Annotated[
        dict[str, dict[str, Any] | None], registered_measurements("edit", DEDICATED)
    ] = Field(
        default_factory=dict,
        description="more registered measurements (experiments.measurements) by name, or "
        "`name@instance` to run one several times, each with its options (null: defaults) and "
        "its own battery part",
    )

    def measurement_options(self) -> dict[str, Any]:
        """Every measurement this battery runs (configured name -> options): those set by
        the fields above, then ``measurements``."""
        chosen: dict[str, Any] = {"formats": None, "counterfact": None}
        if self.probes:
            chosen["probes"] = {"position": self.probe_position}
        if self.relocalize is not None:
            chosen["relocalize"] = self.relocalize
        if self.relearn is not None:
            chosen["relearn"] = self.relearn
        chosen.update({f"relearn@{k}": v for k, v in self.relearn_variants.items()})
        if self.soft_prompt is not None:
            chosen["soft_prompt"] = self.soft_prompt
        return {**chosen, **self.measurements}

    @field_validator("relearn_variants")
    @classmethod
    def _variant_names(cls, value: dict[str, RelearnConfig]) -> dict[str, RelearnConfig]:
        for name in value:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(
                    f"relearn variant name {name!r} must be letters, digits, '-' or '_'"
                )
        return value

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        if "completion" not in value:
            raise ValueError("the battery needs the completion format (the training format)")
        for name in value:
            FORMATS.get(name)
        return value


class ExperimentConfig(Strict):
    """``mechunlearn run``: see the module docstring."""

    kind: Literal["edit"] = "edit"
    name: str = "experiment"
    description: str = ""
    model: str = "gemma3-270m"
    task: TaskName = "sports"
    data: str | None = None
    mode: Literal["edit", "unlearn"] = "edit"
    target: EditTarget = Field(default_factory=EditTarget)
    facts: FactSelection = Field(default_factory=FactSelection)
    localizations: list[LocalizationSpec] = Field(default_factory=default_localizations)
    localize_options: LocalizeOptions = Field(default_factory=LocalizeOptions)
    method_options: MethodOptionsMap = Field(
        default_factory=dict,
        validate_default=True,
        description="each localization method's own options, e.g. {causal_tracing: {window: 10}}",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    train_prompt: Literal["template", "completion"] = Field(
        default="template",
        description="prompts trained on: the bare template or the one-shot prompt",
    )
    sweep: SweepConfig | None = Field(default_factory=SweepConfig)
    hyperparameters: dict[str, Hyperparameters] = Field(
        default_factory=dict,
        description="fixed lr/forget_coef per localization name (used when sweep is null)",
    )
    evaluation: BatteryConfig = Field(default_factory=BatteryConfig)
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    save_models: bool = Field(default=False, description="save each edited model (first seed)")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _legacy_localize_options(cls, data: Any) -> Any:
        return move_legacy_options(data, "localize_options")

    @field_validator("method_options")
    @classmethod
    def _scored_trace(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """An experiment reads only causal tracing's component scores, so it traces only the
        cells they read (half the causal-tracing time) unless the config asks for all."""
        tracing = value.get("causal_tracing", {})
        if "trace_cells" in tracing:
            return value
        return {**value, "causal_tracing": {**tracing, "trace_cells": "scored"}}

    def row_train(self, name: str) -> TrainConfig:
        """The train block of localization ``name`` (the experiment's, with the row's fields)."""
        spec = next(s for s in self.localizations if s.name == name)
        return spec.train_config(self.train)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [spec.name for spec in self.localizations]
        if not names:
            raise ValueError("at least one localization is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"localization names repeat: {names}")
        for spec in self.localizations:
            row = spec.train_config(self.train)
            objective = row.objective
            check_objective_options(objective, row.objective_options)
            if self.mode == "edit" and objective != "edit":
                raise ValueError(
                    f"{spec.name}: mode 'edit' trains with objective 'edit', not {objective!r}"
                )
            if self.mode == "unlearn" and objective == "edit":
                raise ValueError(
                    f"{spec.name}: mode 'unlearn' needs an unlearning objective (unlearn, "
                    "gradient_ascent, npo, rmu, ...)"
                )
        for spec in self.localizations:
            source = spec.hyperparameters_from
            if source is None:
                continue
            origin = next((s for s in self.localizations if s.name == source), None)
            if origin is None or source == spec.name:
                raise ValueError(
                    f"{spec.name}: hyperparameters_from names no other localization ({source!r})"
                )
            if origin.hyperparameters_from is not None:
                raise ValueError(
                    f"{spec.name}: hyperparameters_from {source!r}, which takes its own from "
                    f"{origin.hyperparameters_from!r}; name the row that is swept"
                )
            if origin.match_forgetting is not None:
                raise ValueError(
                    f"{spec.name}: hyperparameters_from {source!r}, which is matched; name the "
                    "row it is matched to, or match this row too"
                )
            if spec.name in self.hyperparameters:
                raise ValueError(f"{spec.name}: both hyperparameters and hyperparameters_from")
        for spec in self.localizations:
            match = spec.match_forgetting
            if match is None:
                continue
            origin = next((s for s in self.localizations if s.name == match.row), None)
            if origin is None or match.row == spec.name:
                raise ValueError(
                    f"{spec.name}: match_forgetting names no other localization ({match.row!r})"
                )
            if origin.match_forgetting is not None:
                raise ValueError(
                    f"{spec.name}: match_forgetting {match.row!r}, which is matched itself; "
                    "name a row with hyper-parameters of its own"
                )
            if spec.hyperparameters_from is not None or spec.name in self.hyperparameters:
                raise ValueError(
                    f"{spec.name}: match_forgetting chooses the learning rate; drop "
                    "hyperparameters_from / hyperparameters"
                )
            if self.sweep is None and match.lr is None:
                raise ValueError(f"{spec.name}: match_forgetting needs lr values or a sweep")
        if self.sweep is None:
            missing = [
                s.name
                for s in self.localizations
                if s.name not in self.hyperparameters
                and s.hyperparameters_from is None
                and s.match_forgetting is None
            ]
            if missing:
                raise ValueError(
                    f"without a sweep, give hyperparameters for every localization; missing: {missing}"
                )
        unknown = set(self.hyperparameters) - set(names)
        if unknown:
            raise ValueError(f"hyperparameters for unknown localizations: {sorted(unknown)}")
        if self.mode == "edit" and self.target.kind == "dataset" and self.task != "counterfact":
            raise ValueError("target.kind 'dataset' needs a task with new answers (counterfact)")
        return self


def shipped_configs() -> dict[str, str]:
    """Experiment configs shipped in the package: name -> path."""
    from importlib import resources

    folder = resources.files("mechunlearn.experiments").joinpath("configs")
    return {
        p.name.removesuffix(".yaml"): str(p) for p in folder.iterdir() if p.name.endswith(".yaml")
    }


def resolve_config(name_or_path: str) -> str:
    """A YAML path, or the name of a shipped config (e.g. ``sports-athlete-edit-16``)."""
    from pathlib import Path

    from mechunlearn.errors import ConfigError

    if Path(name_or_path).is_file():
        return name_or_path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a shipped config; shipped: {', '.join(sorted(shipped))}"
    )
