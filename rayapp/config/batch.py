"""`kind: batch` — autoscaled batch generation with vLLM on Ray Data (teacher labels and
rationales, logprobs, plain inference), written by the replicas as parts that a re-run skips."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayapp.config.base import EngineConfig, ModelConfig, SamplingConfig, StrictModel, TaskType


class FewShotConfig(StrictModel):
    question: str = Field(..., description="Example question.")
    rationale: str = Field(..., description="Step-by-step reasoning for it.")
    answer: str = Field(..., description="Its answer (rendered as 'So the answer is <answer>.').")


class RationalesConfig(StrictModel):
    task_type: TaskType = Field("free", description="Answer kind: picks the default few-shot template and how labels are parsed and compared.")
    system: str | None = Field(None, description="System prompt replacing the template's default.")
    shots: list[FewShotConfig] | None = Field(None, description="Few-shot examples replacing the template's defaults.")
    self_consistency_n: int = Field(1, gt=0, description="Completions sampled per question; the majority label wins (needs sampling.temperature > 0 when > 1).")
    gold_filter: Literal["drop", "flag", "off"] = Field("drop", description="Rows whose teacher label disagrees with the gold label (output_text): drop them, keep them with gold_match: false, or do not check.")


def check_rationale_sampling(rationales: RationalesConfig, sampling: SamplingConfig, where: str = "") -> None:
    """Self-consistency samples several rationales per question: at temperature 0 they are all the same."""
    if rationales.self_consistency_n > 1 and sampling.temperature == 0:
        raise ValueError(
            f"{where}rationales.self_consistency_n is {rationales.self_consistency_n} but {where}sampling.temperature is 0: "
            f"every sample would be the same; set {where}sampling.temperature > 0 or {where}rationales.self_consistency_n: 1"
        )


class BatchJobConfig(StrictModel):
    kind: Literal["batch"] = Field("batch", description="Job kind.")
    name: str = Field("batch", description="Job name; used in logs.")
    task: Literal["generate", "rationales"] = Field("generate", description="'generate': one completion row per prompt row; 'rationales': teacher-output rows (label + rationale) for distilling step-by-step.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The teacher / generation model.")
    input: str = Field("data/prompts.jsonl", description="Prompt rows ({input_text} or {messages}; {input_text, output_text?} for rationales): .jsonl, .parquet or a saved datasets directory.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N input rows.")
    on_bad_rows: Literal["error", "drop"] = Field("drop", description="Input rows that cannot be parsed: 'error' stops before generating; 'drop' counts them and lists them in rejects.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings for each replica (engine.num_engines is ignored: see concurrency).")
    concurrency: list[int] = Field(default_factory=lambda: [1, 1], description="[min, max] engine replicas of the autoscaling Ray Data actor pool.")
    chat: Literal["auto", "always", "never"] = Field("auto", description="Send input_text as a user message through the tokenizer's chat template ('auto': when the model has one); messages rows always use it.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling for every prompt.")
    rationales: RationalesConfig = Field(default_factory=RationalesConfig, description="Template, parsing and filtering when task is 'rationales'.")
    batch_size: int = Field(32, gt=0, description="Rows in one call of an engine replica. A replica works on enough calls at once to fill engine.max_num_seqs, and one more: vLLM batches their sequences continuously, so a call's long completions do not leave the engine idle.")
    rows_per_shard: int = Field(128, gt=0, description="Input rows per read block: what one Ray Data read task reads (and about the rows of one output part). A re-run skips every row already committed, whatever the block.")
    output_dir: str = Field("outputs/batch", description="A local path, shared mount or s3:// / gs:// URI (every replica writes there). Gets parts/ and checkpoint/ (written by the replicas; what a re-run skips), then output.jsonl (input order), rejects.jsonl, stats.json, summary.json, manifest.json, config.resolved.yaml.")

    @model_validator(mode="after")
    def _check(self):
        if len(self.concurrency) != 2 or not 1 <= self.concurrency[0] <= self.concurrency[1]:
            raise ValueError(f"concurrency {self.concurrency}: expected [min, max] replicas with 1 <= min <= max, e.g. [1, 2]")
        if self.task == "rationales":
            check_rationale_sampling(self.rationales, self.sampling)
        if self.task == "generate" and self.sampling.n > 1 and self.sampling.temperature == 0:
            raise ValueError("sampling.n > 1 with sampling.temperature 0 gives identical completions; raise sampling.temperature")
        return self
