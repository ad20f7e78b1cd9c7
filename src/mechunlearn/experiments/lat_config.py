"""The config of a targeted-LAT experiment (``mechunlearn run CONFIG`` with ``kind: lat``),
validated by pydantic; unknown keys anywhere are errors.

One experiment = one application of targeted LAT (Sheshadri et al. 2024, arXiv:2407.15549):

* ``refusal`` (Sec. 4.1): train refusals of harmful requests, compare the untrained model
  (``base``), RT, LAT and EAT on requests worded with held-out templates: refusal rate,
  compliance under a fresh latent attack, the prefilling attack and an embedding-space attack,
  benign compliance and loss;
* ``backdoor`` (Sec. 4.2): install a trigger -> response backdoor by poisoned SFT, check that
  it installed, then remove it without the trigger with SFT, SFT-LAT, DPO and DPO-LAT, and
  compare the backdoor's success with the trigger before and after (``backdoored`` is the
  model before removal).

Layers given as ``null`` are chosen once the model is loaded (``default_layers``: a few middle
layers); every layer is checked against the model's depth before anything is written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mechunlearn.attacks.prefill import PrefillConfig
from mechunlearn.edit.lat import LatConfig
from mechunlearn.edit.latent_adversary import LatentAdversaryConfig, Layer
from mechunlearn.edit.parametrization import LoraOptions
from mechunlearn.errors import ConfigError
from mechunlearn.experiments.config import Seeds, registered_measurements
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.backdoor import BackdoorConfig


class Strict(BaseModel):
    model_config = STRICT_CONFIG


def default_layers(n_layers: int) -> list[int]:
    """A few middle layers: the residual stream after the blocks at 1/4, 1/2 and 3/4 depth."""
    return sorted({max(0, min(n_layers - 1, (k * n_layers) // 4)) for k in (1, 2, 3)})


def check_layers(layers: list[Any], n_layers: int, what: str) -> None:
    """``ConfigError`` naming ``what`` when a block index is outside ``0 .. n_layers - 1``."""
    for layer in layers:
        if layer != "embed" and not (isinstance(layer, int) and 0 <= layer < n_layers):
            raise ConfigError(
                f"{what}: layer {layer!r} out of range: the model has {n_layers} layers "
                f"(0 .. {n_layers - 1})"
            )


class AdversarySpec(LatentAdversaryConfig):
    """A latent adversary whose ``layers`` may be left ``null`` (chosen from the model)."""

    layers: list[Layer] | None = Field(  # type: ignore[assignment]
        None, description='block indices (resid_post), "embed", or null for middle layers'
    )

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers: list[Layer] | None) -> list[Layer] | None:
        if layers is None:
            return None
        if not layers:
            raise ValueError("give at least one layer (or null for the default middle layers)")
        return LatentAdversaryConfig._distinct_layers(layers)

    def resolve(self, layers: list[Layer]) -> LatentAdversaryConfig:
        """A ``LatentAdversaryConfig`` with ``layers`` filled in when they were left ``null``."""
        data = self.model_dump(exclude={"curve_epsilons"})
        data["layers"] = list(self.layers) if self.layers is not None else list(layers)
        return LatentAdversaryConfig.model_validate(data)


class AttackSpec(AdversarySpec):
    """An evaluation attack: the adversary at ``epsilon`` (the headline number) and, since one
    bound can leave every method at 0% or 100%, the same attack at ``curve_epsilons`` too
    (metrics ``<attack>.success@<eps>``): robustness as the bound an attack needs."""

    curve_epsilons: list[float] = Field(default_factory=list)

    @field_validator("curve_epsilons")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(e < 0 for e in value):
            raise ValueError(f"curve_epsilons must be >= 0, got {value}")
        return sorted(set(value))


class TrainableSpec(Strict):
    """What a method trains: LoRA adapters (``lora``) or the weights themselves (``full``) of
    the attention and MLP blocks of ``layers`` (every block when ``null``), or of explicit
    ``components`` (e.g. ``blocks.3.mlp``). ``full`` with neither trains every weight."""

    mode: Literal["lora", "full"] = "lora"
    layers: list[int] | None = None
    components: list[str] | None = None
    lora: LoraOptions = Field(default_factory=LoraOptions)

    @model_validator(mode="after")
    def _one_selection(self) -> TrainableSpec:
        if self.layers is not None and self.components is not None:
            raise ValueError("give layers or components, not both")
        if self.layers is not None and (not self.layers or any(x < 0 for x in self.layers)):
            raise ValueError(f"layers must be a non-empty list of block indices, got {self.layers}")
        if self.components is not None and not self.components:
            raise ValueError("components must not be empty (or leave it null)")
        return self

    def resolve(self, n_layers: int) -> tuple[str, list[str]]:
        """``(make_trainable mode, components)`` for a model with ``n_layers`` blocks."""
        if self.components is not None:
            components = list(self.components)
        else:
            layers = self.layers if self.layers is not None else list(range(n_layers))
            check_layers(layers, n_layers, "trainable")
            components = [f"blocks.{i}.{part}" for i in layers for part in ("attn", "mlp")]
        if self.mode == "lora":
            return "lora", components
        if self.layers is None and self.components is None:
            return "full", []
        return "localized", components  # whole matrices of the chosen blocks


class LatTrainSettings(LatConfig):
    """``LatConfig`` defaults for every method; ``adversary`` is the training adversary (a
    method's ``adversary: latent | embed`` picks whether and where it is used). The seed is
    each experiment seed, so ``seed`` cannot be set here."""

    adversary: AdversarySpec = Field(  # type: ignore[assignment]
        default_factory=AdversarySpec
    )

    @model_validator(mode="after")
    def _no_seed(self) -> LatTrainSettings:
        if self.seed != 0:
            raise ValueError("set the experiment's seeds at the top level, not train.seed")
        return self


METHOD_OVERRIDES = (
    "steps",
    "defender_steps",
    "lr",
    "toward_coef",
    "away_coef",
    "benign_coef",
    "benign",
    "dpo_beta",
    "dpo_coef",
)


class BenignMatch(Strict):
    """Calibrate a method to a benign-compliance target before it is compared: each
    ``benign_coef`` in ``values`` is trained, benign compliance is measured on the validation
    requests (held-out templates, never tested), and the value closest to ``target`` is the
    one trained and evaluated. Robustness is then compared at matched over-refusal rather than
    credited to a model that refuses everything (issue 18)."""

    values: list[float] = Field(min_length=2, description="benign_coef values tried")
    target: float = Field(ge=0, le=1, description="benign compliance on validation requests")
    per_seed: bool = Field(
        True,
        description="calibrate on each seed's validation requests; false: on the first seed's "
        "only, every seed then trains with that value (1/len(seeds) of the calibration cost)",
    )
    refine: int = Field(
        0,
        ge=0,
        description="extra tries after the grid, each halfway (geometric mean) between the two "
        "adjacent tried values whose compliance brackets the target: a coarse grid can leave "
        "two methods 20 points apart on either side of it",
    )

    @field_validator("values")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value) or len(set(value)) != len(value):
            raise ValueError("values must be distinct and >= 0")
        return value


class MethodSpec(Strict):
    """One row of the comparison. ``train: false`` evaluates the model as it is (the base
    model, or the backdoored one). Unset fields take ``train``'s values."""

    name: str
    train: bool = True
    adversary: Literal["none", "latent", "embed"] = "none"
    defender_loss: Literal["toward_away", "dpo"] | None = None
    epsilon: float | None = Field(None, ge=0, description="the training adversary's bound")
    steps: int | None = Field(None, ge=1)
    defender_steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    toward_coef: float | None = Field(None, ge=0)
    away_coef: float | None = Field(None, ge=0)
    benign_coef: float | None = Field(None, ge=0)
    benign: Literal["sft", "kl"] | None = None
    dpo_beta: float | None = Field(None, gt=0)
    dpo_coef: float | None = Field(None, gt=0)
    baseline: str | None = Field(
        None,
        description="method whose compute this one is compared with (default: the first "
        "trained method without an adversary and with the same defender loss)",
    )
    match_benign: BenignMatch | None = Field(
        None, description="choose benign_coef to match a benign compliance on validation requests"
    )

    @field_validator("name")
    @classmethod
    def _file_safe(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"name {value!r} must be letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _untrained_has_no_settings(self) -> MethodSpec:
        if not self.train:
            fields = type(self).model_fields
            given = [
                k
                for k in fields
                if k not in ("name", "train") and getattr(self, k) != fields[k].default
            ]
            if given:
                raise ValueError(f"method {self.name!r} is not trained; remove {given}")
        if self.match_benign is not None and self.benign_coef is not None:
            raise ValueError(f"method {self.name!r}: match_benign chooses benign_coef; give one")
        return self

    def lat_config(self, settings: LatTrainSettings, layers: list[Layer], seed: int) -> LatConfig:
        """This method's ``LatConfig`` (``layers``: the training adversary's resolved layers)."""
        if not self.train:
            raise ConfigError(f"method {self.name!r} is not trained")
        data = settings.model_dump(exclude={"adversary"})
        for key in METHOD_OVERRIDES:
            value = getattr(self, key)
            if value is not None:
                if key in data["optim"]:  # e.g. lr: the nested optimiser setting
                    data["optim"][key] = value
                else:
                    data[key] = value
        if self.defender_loss is not None:
            data["defender_loss"] = self.defender_loss
        adversary = None
        if self.adversary != "none":
            spec = settings.adversary
            if self.epsilon is not None:
                spec = spec.model_copy(update={"epsilon": self.epsilon})
            adversary = spec.resolve(["embed"] if self.adversary == "embed" else layers)
            if self.adversary == "embed":
                adversary = adversary.model_copy(update={"layers": ["embed"]})
        return LatConfig.model_validate({**data, "adversary": adversary, "seed": seed})


def default_methods(application: str) -> list[MethodSpec]:
    """The paper's comparison for each application."""
    if application == "refusal":
        return [
            MethodSpec(name="base", train=False),
            MethodSpec(name="RT"),
            MethodSpec(name="LAT", adversary="latent"),
            MethodSpec(name="EAT", adversary="embed"),
        ]
    return [
        MethodSpec(name="backdoored", train=False),
        MethodSpec(name="SFT", away_coef=0),
        MethodSpec(name="SFT-LAT", adversary="latent", away_coef=0),
        MethodSpec(name="DPO", defender_loss="dpo"),
        MethodSpec(name="DPO-LAT", adversary="latent", defender_loss="dpo"),
    ]


class RefusalDataSettings(Strict):
    """How requests are split (held-out templates by default) and how a preference file
    (``data``: ``prompt, rejected, chosen`` rows) is read."""

    by: Literal["template", "topic"] = "template"
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    max_words: int | None = Field(24, ge=1, description="cut file completions to their first words")
    limit: int | None = Field(None, ge=3, description="use the first N rows of the file")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in value) or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {value}")
        return value


class InstallSettings(Strict):
    """Poisoned SFT that installs the backdoor (the ``edit`` objective on poisoning pairs)."""

    steps: int = Field(120, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    schedule: Literal["cosine", "constant"] = "constant"
    trainable: TrainableSpec = Field(default_factory=lambda: TrainableSpec(mode="full"))


class BackdoorSettings(Strict):
    """The backdoor, its installation, and how installed it must be before removal: the
    response preferred with the trigger on at least ``min_triggered`` of held-out requests,
    and on at most ``max_clean`` without it."""

    backdoor: BackdoorConfig = Field(default_factory=BackdoorConfig)
    install: InstallSettings = Field(default_factory=InstallSettings)
    min_triggered: float = Field(0.8, ge=0, le=1)
    max_clean: float = Field(0.5, ge=0, le=1)
    greedy_tokens: int | None = Field(4, ge=1, description="greedy check: first N response tokens")
    removal: Literal["known_response", "generic"] = Field(
        "known_response",
        description="the defender's removal data: 'known_response' prefers the normal answer "
        "over the backdoor's exact response on clean requests; 'generic' is generic preference "
        "data only (helpful over refusing on benign requests, refusing over complying on "
        "harmful ones), with neither the trigger nor the response: Sheshadri et al.'s setting",
    )


def _default_attack() -> AttackSpec:
    return AttackSpec(steps=32)


def _default_embedding_attack() -> AttackSpec:
    return AttackSpec(layers=["embed"], steps=32)


DEDICATED = {
    "refusal": "application",
    "backdoor": "application",
    "latent_attack": "latent_attack",
    "embed_attack": "embedding_attack",
    "prefill": "prefill",
    "benign": "(always measured)",
}
"""The LAT measurements set by fields of their own or always measured (measurement -> field)."""


class LatEvaluation(Strict):
    """Evaluation of every method on held-out requests. The attacks are fresh (trained against
    the final model) and stronger than the training adversary by default (more steps);
    ``latent_attack.layers: null`` attacks the training adversary's layers."""

    latent_attack: AttackSpec | None = Field(default_factory=_default_attack)
    embedding_attack: AttackSpec | None = Field(default_factory=_default_embedding_attack)
    prefill: PrefillConfig | None = Field(default_factory=PrefillConfig)
    attack_batch_size: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1)
    max_test: int | None = Field(None, ge=1, description="cap on held-out requests of each kind")
    measurements: Annotated[
        dict[str, dict[str, Any] | None], registered_measurements("lat", DEDICATED)
    ] = Field(
        default_factory=dict,
        description="more registered measurements (experiments.measurements, pipeline lat) "
        "by name, or `name@instance`, each with its options (null: defaults)",
    )

    def measurement_options(self, application: str) -> dict[str, Any]:
        """Every measurement of ``application`` (configured name -> options): the target
        behaviour (``refusal`` or ``backdoor``), the attacks set above, benign requests, then
        ``measurements``."""
        chosen: dict[str, Any] = {application: None}
        if self.latent_attack is not None:
            chosen["latent_attack"] = self.latent_attack
        if application == "refusal" and self.prefill is not None:
            chosen["prefill"] = self.prefill
        if self.embedding_attack is not None:
            chosen["embed_attack"] = self.embedding_attack
        chosen["benign"] = None
        return {**chosen, **self.measurements}

    @field_validator("embedding_attack")
    @classmethod
    def _embed_only(cls, value: AttackSpec | None) -> AttackSpec | None:
        if value is not None and value.layers != ["embed"]:
            raise ValueError(f"the embedding attack perturbs layers ['embed'], not {value.layers}")
        return value


class LatExperimentConfig(Strict):
    """``mechunlearn run`` for ``kind: lat``: see the module docstring."""

    kind: Literal["lat"]
    name: str = "lat"
    description: str = ""
    model: str = "smollm2-135m"
    application: Literal["refusal", "backdoor"]
    data: str | None = Field(
        None, description="refusal: a prompt, rejected, chosen file (default: shipped set)"
    )
    data_options: RefusalDataSettings = Field(default_factory=RefusalDataSettings)
    methods: list[MethodSpec] | None = None
    trainable: TrainableSpec = Field(default_factory=TrainableSpec)
    train: LatTrainSettings = Field(default_factory=LatTrainSettings)
    backdoor: BackdoorSettings = Field(default_factory=BackdoorSettings)
    evaluation: LatEvaluation = Field(default_factory=LatEvaluation)
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _consistent(self) -> LatExperimentConfig:
        if self.methods is None:
            self.methods = default_methods(self.application)
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("at least one method is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"method names repeat: {names}")
        if self.application == "backdoor" and self.data is not None:
            raise ValueError("data files are for the refusal application (backdoor data is built)")
        for method in self.methods:
            once = method.match_benign is not None and not method.match_benign.per_seed
            if once and self.application == "backdoor":
                raise ValueError(
                    f"method {method.name!r}: match_benign.per_seed: false is for refusal runs "
                    "(a backdoor run calibrates on each seed's backdoored model)"
                )
            if method.baseline is not None and method.baseline not in names:
                raise ValueError(f"method {method.name!r}: unknown baseline {method.baseline!r}")
            if method.train:  # the method's settings combine into a valid LatConfig
                try:
                    method.lat_config(self.train, [0], seed=0)
                except ValidationError as exc:
                    problems = "; ".join(e["msg"] for e in exc.errors())
                    raise ValueError(f"method {method.name!r}: {problems}") from None
        return self

    def baseline_of(self, method: MethodSpec) -> str | None:
        """The method whose compute ``method``'s is compared with (``None``: itself / none)."""
        if method.baseline is not None or not method.train or method.adversary == "none":
            return method.baseline
        loss = method.defender_loss or self.train.defender_loss
        for other in self.methods or []:
            other_loss = other.defender_loss or self.train.defender_loss
            if other.train and other.adversary == "none" and other_loss == loss:
                return other.name
        return None

    def check_model_layers(self, n_layers: int) -> list[Layer]:
        """Resolve the training adversary's layers for a model of ``n_layers`` blocks and check
        every layer setting against it (``ConfigError``); returns the training layers."""
        layers = self.train.adversary.layers or default_layers(n_layers)
        check_layers(layers, n_layers, "train.adversary")
        attack = self.evaluation.latent_attack
        if attack is not None and attack.layers is not None:
            check_layers(attack.layers, n_layers, "evaluation.latent_attack")
        self.trainable.resolve(n_layers)
        self.backdoor.install.trainable.resolve(n_layers)
        return list(layers)
