"""`raybooth evaluate` configuration (configs/evaluate/*.yaml): the model to judge, the subject it
was trained on, and the `evaluation:` section that training configs share."""

from __future__ import annotations

from pydantic import Field

from raybooth.platform.config import EvaluationSection, ModelOptions, Section, SubjectConfig


class EvaluateConfig(Section):
    model: str = Field(default="tiny", description="any model reference: tiny, DIR, org/name, models:/NAME@ALIAS")
    model_options: ModelOptions = Field(default_factory=ModelOptions)
    lora: str | None = Field(default=None, description="a LoRA adapter folder on top of `model`")
    subject: SubjectConfig = Field(default_factory=SubjectConfig)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    output_dir: str = "runs/evaluations/demo"
