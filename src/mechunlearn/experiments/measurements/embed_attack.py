"""A fresh embedding-space attack (targeted LAT, ``evaluation.embedding_attack``): the latent
attack on the token embeddings, the input-space threat LAT is compared against."""

from __future__ import annotations

from mechunlearn.experiments.lat_config import AttackSpec
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.latent_attack import attack_measurement
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult
from mechunlearn.report.columns import Column

COLUMNS = (
    Column("embed_attack.success", "compliance under embedding attack", True, "attack",
           ("refusal",)),
    Column("embed_attack.success", "backdoor under embedding attack", True, "attack",
           ("backdoor",)),
)  # fmt: skip


@MEASUREMENTS.register("embed_attack", config=AttackSpec, columns=COLUMNS, pipeline="lat")
def measure_embed_attack(ctx: LatContext, options: AttackSpec, name: str) -> BatteryResult:
    return attack_measurement(ctx, options, ["embed"], name)
