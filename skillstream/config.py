"""A recipe as validated pydantic models, with `--set key.path=value` overrides.

Every field carries a description (PEFT/TRL style), so `skillstream recipes --explain` and the
docs can be generated from here. Validation errors are turned into one line naming the key.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .data.readers import read_text
from .errors import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Strict(BaseModel):
    # frozen: a loaded recipe is read, never changed, by everything it is passed to (a changed copy is
    # made with model_copy(update=...)), so the stages it resolves once stay true
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)


class ComponentConfig(BaseModel):
    """A swappable part: `name` (registered short name or module:Class) plus its keyword arguments."""
    model_config = ConfigDict(extra="allow")
    name: str


def _component_shorthand(v):
    return {"name": v} if isinstance(v, str) else v


class QuantizationConfig(_Strict):
    """QLoRA: the frozen backbone loaded in 4 or 8 bits through bitsandbytes (a CUDA GPU needed)."""
    bits: Literal[4, 8] = Field(..., description="4: NF4 with double quantization, computing in bf16 (fp16 on a GPU "
                                                 "without bf16) (QLoRA); 8: LLM.int8().")


class ModelConfig(_Strict):
    name: str = Field("smollm2-135m", description="'smollm2-135m' (bundled), 'tiny' (random test model), a Hugging Face id or a local path.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for Hugging Face ids.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless the recipe turns it on.")
    freeze_backbone: bool = Field(True, description="Freeze the base weights; only adapters (and heads) train.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for a registered model builder (e.g. BDH sizes).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the backbone's weights: 'auto' is bfloat16 where the run computes in bf16 "
                               "(train.bf16, whose auto is on where the hardware computes it) and float32 elsewhere or "
                               "when the weights train. LoRA adapters, "
                               "heads and the router stay float32 whatever it is; weights that train (freeze_backbone: "
                               "false) must be float32. Registered models (bdh) are float32.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="Attention kernel of Hugging Face models: sdpa (torch's; transformers falls back to eager for "
                            "a model without it), flash_attention_2 (needs the flash-attn package and a CUDA GPU) or eager; "
                            "registered models (bdh) have their own attention.")
    quantization: QuantizationConfig | None = Field(
        None, description="Load the frozen backbone quantized, e.g. {bits: 4} (QLoRA); needs a CUDA GPU and "
                          "bitsandbytes (pip install 'skillstream[quantization]').")


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="Module names to adapt, or 'all-linear' (every linear projection but the LM head).")
    per_stage: bool = Field(False, description="One expert per stage (named after it); evaluation picks each task's expert by its name (the oracle-task-id baseline).")


class SourceConfig(_Strict):
    """One data source; `format` says how to turn its rows into examples."""

    source: str = Field(..., description="'nl2bash', 'bfcl' or 'bfcl:CAT1,CAT2' (BFCL tool-calling conversations; categories simple, live_simple, multiple, live_multiple, parallel, irrelevance), a classification task folder, a .jsonl/.json/.csv/.parquet file, or 'hf:NAME[:CONFIG]'.")
    split: str = Field("train", description="Split to read: 'train' or 'test' (builtins, task folders, HF datasets).")
    format: Literal["auto", "prompt_completion", "messages", "text", "classification", "preference"] = Field(
        "auto", description="How rows become examples; 'auto' picks from the columns.")
    columns: dict[str, str] = Field(default_factory=dict, description="Column mapping {our name: your column}, e.g. {prompt: question, completion: answer}.")
    instruction: str | None = Field(None, description="Instruction put before each input (classification tasks, prompt/completion).")
    offset: int = Field(0, ge=0, description="Skip the first N examples (after the split, before `limit`): with `limit`, a later "
                                             "slice of a source, e.g. a stage that reads new requests of a source an earlier "
                                             "stage read (that one `limit: 80`, this one `offset: 80, limit: 80`).")
    limit: int | None = Field(None, gt=0, description="Use only the first N examples (after the split and `offset`).")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="Relative sampling weight when several sources are mixed (finite, > 0).")
    build: ComponentConfig | None = Field(None, description="Produce this source at the start of its stage: a builder "
                                          "(registered name, e.g. verifier_pairs, or module:function) run on the current model writes "
                                          "the JSONL file `source`, a path relative to the run directory.")
    invalid_labels: Literal["error", "skip"] | None = Field(
        None, description="Classification task folders: what a row whose label is not in labels.json does "
                          "(see data.invalid_labels, which a source without its own setting follows).")


class EvalTaskConfig(SourceConfig):
    name: str = Field(..., description="Task name used in results.json.")
    split: str = "test"
    metric: Literal["auto", "accuracy", "exact_match", "bash", "perplexity", "tool_call", "function_call",
                    "final_answer", "preference", "unit_tests", "tool_workflow", "tool_use"] = Field(
        "auto", description="accuracy (option scoring), exact_match / bash / tool_call (greedy generation), perplexity, "
                            "unit_tests (pass@k of generated Python in the sandbox), tool_workflow (multi-step tool "
                            "dialogues checked step by step: calls by AST, the final answer by exact match), tool_use "
                            "(arithmetic problems answered with a real calculator: answer accuracy, calls made where they help).")
    samples: int = Field(1, gt=0, description="unit_tests: answers per problem (1: greedy pass@1; n > 1: sampled at "
                                              "temperature 0.8, pass@1/10/100 up to n by the unbiased estimator).")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget for generative metrics.")
    expert: str | None = Field(None, description="Skill-stream recipes: answer this task with this expert (e.g. expert_0) instead of the router's choice.")
    also: list[Literal["accuracy", "exact_match"]] = Field(
        default_factory=list, description="Further protocols scored on the same task (results.json 'protocols').")


class DataConfig(_Strict):
    train: list[SourceConfig] = Field(default_factory=list, description="Training sources, mixed by weight.")
    eval: list[EvalTaskConfig] = Field(default_factory=list, description="Evaluation tasks, scored before training and after every stage.")
    max_length: int = Field(512, gt=8, description="Longer examples are truncated (and counted in the summary); one left with no trainable token (its prompt fills max_length) is not trained on, counted as untrainable.")
    system_prompt: str | None = Field(None, description="System message for chat-formatted examples.")
    eval_batch_size: int = Field(16, gt=0, description="Examples per evaluation batch.")
    eval_cache: str | None = Field(None, description="A folder where evaluations are remembered by the weights that serve them and "
                                                     "their inputs, shared by the runs that name it (evaluation/memo.py); within a "
                                                     "run they are remembered without it.")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="Share of each training source held out for validation (early stopping, validation_eval): never trained on, by a stage or a skill stream's chunks.")
    validation_eval: bool = Field(False, description="After the last stage, also score each evaluation task on the training examples "
                                  "held out by validation_fraction from the training sources that read the task's own source "
                                  "(never the test split); results.json 'validation' (what `skillstream sweep` selects on). "
                                  "A skill stream answers them through its router, as it answers the test tasks. "
                                  "Read from the recipe's data, not a stage's.")
    stream: str | None = Field(None, description="A stream folder (one stage per task, every task evaluated after each; replaces stages), "
                                                 "or offline_skills: the stream the package builds offline from installed data.")
    stream_train_limit: int | None = Field(None, gt=0, description="Training examples per stream task.")
    stream_test_limit: int | None = Field(None, gt=0, description="Test examples per stream task.")
    stream_protocols: list[Literal["exact_match", "accuracy"]] = Field(
        default_factory=lambda: ["exact_match", "accuracy"],
        description="Evaluation protocols of stream tasks; the first fills results.json's matrix.")
    stream_max_new_tokens: int = Field(8, gt=0, description="Generation budget when stream tasks are scored by exact match.")
    invalid_labels: Literal["error", "skip"] = Field(
        "error", description="A row of a classification task folder whose label is not in labels.json (e.g. MNLI's '-' rows): "
                             "'error' stops with one line naming the file and row; 'skip' drops such rows, printing one warning "
                             "per file (file, count, first items) and recording them in results.json's skipped_rows. "
                             "Applies to data.train, data.eval and data.stream tasks.")

    @model_validator(mode="after")
    def _invalid_labels_to_sources(self):  # sources without their own setting follow data.invalid_labels
        for src in [*self.train, *self.eval]:
            if src.invalid_labels is None:  # still being built: the one write to a frozen config
                object.__setattr__(src, "invalid_labels", self.invalid_labels)
        return self


class TrainConfig(_Strict):
    steps: int = Field(100, ge=0, description="Optimizer steps per stage.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_batch_tokens: int | None = Field(None, gt=0, description="Cap on a forward's padded tokens (rows x longest): a micro-batch "
                                         "above it runs as pieces, longest first, each backward weighted by its share of the "
                                         "batch's labelled tokens, so the step's gradient is the whole batch's (up to rounding) "
                                         "while activation memory follows the cap; a sequence longer than the cap is a piece "
                                         "alone. Needs an objective whose loss is a mean over its loss_weight (lm); not with "
                                         "DeepSpeed or FSDP. null = no cap.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant", "wsd", "linear"] = Field("cosine", description="Warmup then cosine / constant / warmup-stable-decay / linear decay.")
    warmup_steps: int = Field(10, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of steps spent decaying in 'wsd'.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (cosine, wsd, linear).")
    max_grad_norm: float | None = Field(1.0, description="Clip gradients to this global norm; null disables.")
    bf16: Literal["auto", True, False] = Field("auto", description="bf16 autocast; 'auto' turns it on where the device supports it.")
    gradient_checkpointing: bool = Field(False, description="Recompute the backbone's activations in the backward pass instead of "
                                                            "keeping them (less memory, about a third more compute); set once per run.")
    batching: Literal["length_grouped", "random"] = Field("length_grouped", description="Group examples of similar length to waste little compute on padding.")
    log_every: int = Field(5, gt=0)
    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every N steps (and at each stage end).")
    keep_checkpoints: int = Field(2, gt=0)
    max_bad_steps: int = Field(5, gt=0, description="Steps in a row with a non-finite loss or gradient (each skipped, weights unchanged) after which the run stops with exit status 3.")
    collapse_steps: int = Field(10, gt=0, description="Steps in a row with gradient norm 0 or a token loss at ln(vocabulary) (the uniform guess) that raise a 'collapsed' alert.")
    sample_every: int = Field(0, ge=0, description="Generate from sample_prompts every N steps and at each stage end (greedy, into samples.jsonl, the monitor, the report and TensorBoard); 0 = off.")
    sample_prompts: list[str] = Field(default_factory=list, description="User messages to sample (chat-templated like evaluation prompts); empty = the first 2 test prompts of each evaluation task.")


class StageConfig(_Strict):
    name: str
    objective: ComponentConfig | None = Field(None, description="Objective of this stage (default: the recipe's).")
    data: DataConfig | None = Field(None, description="Replaces the recipe's data for this stage.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the recipe's train settings for this stage.")

    @field_validator("objective", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return _component_shorthand(v)


class CalibrationConfig(_Strict):
    prior_slope: float = Field(20.0, gt=0, description="calibrated decider: before any outcome, the logistic model is the threshold rule, logit = prior_slope * (weighted similarity - similarity_threshold); its prior is centred there.")
    prior_precision: float = Field(1.0, gt=0, description="calibrated decider: precision of the Gaussian prior on the logistic weights (larger: outcomes move it more slowly).")
    explore: float = Field(1.0, ge=0, description="calibrated decider: UCB bonus, in standard deviations of the logit (Laplace approximation), added while it has fewer than explore_outcomes outcomes; 0 = no exploration.")
    explore_outcomes: int = Field(10, ge=0, description="calibrated decider: outcomes after which the UCB bonus stops.")
    reuse_probability: float = Field(0.5, gt=0, lt=1, description="calibrated decider: reuse an expert when its (optimistic) probability of successful reuse is at least this.")
    harm_tolerance: float = Field(0.02, ge=0, description="Outcome of a reuse: it failed when the expert's loss on its own held-out examples rose by more than this fraction; outcome of a create: reuse would have failed when the new expert's held-out loss is below the best old expert's by more than this fraction.")


class NoveltyConfig(_Strict):
    similarity_threshold: float = Field(0.5, ge=0, le=1, description="A chunk whose best similarity to every expert profile is below this is novel.")
    entropy_threshold: float = Field(0.5, ge=0, le=1, description="Reuse the best-matching expert only when the router's normalised entropy on the chunk is at most this.")
    window: int = Field(2, ge=1, description="Consecutive novel chunks that create a new expert (held back, untrained, until then).")
    spread_z: float | None = Field(None, ge=0, description="Calibrated thresholds: an expert is reused only by a chunk at least as similar as mean - spread_z * std of the similarities of the chunks it took as its own before (never below similarity_threshold); null = the absolute threshold alone.")
    min_spread: float = Field(0.01, gt=0, description="Smallest std used by the calibrated thresholds (an expert with one or two reused chunks has no usable spread yet).")
    signal_examples: int = Field(4, gt=0, description="Examples of each chunk whose triple signal (embedding, gradient sketch, context) is compared with the expert profiles.")
    weights: dict[str, float] = Field(default_factory=lambda: {"embedding": 0.4, "gradient": 0.4, "context": 0.2},
                                      description="Weights of the similarity's three components.")
    decider: Literal["threshold", "calibrated"] = Field("threshold", description="How a chunk is judged close enough to reuse an expert: threshold = the similarity thresholds above with the entropy guard; calibrated = a logistic model over the similarity components and router entropy fitted online on the outcomes of past decisions, with UCB exploration (needs experts.validation.holdout >= 1).")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="The calibrated decider's prior, exploration and outcome rule.")

    @field_validator("weights")
    @classmethod
    def _known_components(cls, v):
        unknown = sorted(set(v) - {"embedding", "gradient", "context"})
        if unknown:  # else a typo reaches SimilarityWeights(**weights) as a TypeError
            raise ValueError(f"unknown similarity components {unknown} (known: embedding, gradient, context)")
        return v


def relative_depths(depth) -> tuple[float, ...]:
    """A router depth (one relative depth, or several whose features are concatenated) as a tuple;
    the one check of its range, shared by the recipe and skillstream.experts.router."""
    depths = (float(depth),) if isinstance(depth, (int, float)) else tuple(float(d) for d in depth)
    if not depths or any(not 0.0 < d <= 1.0 for d in depths):
        raise ValueError("must be in (0, 1], one value or a non-empty list of them")  # the caller names the value
    return depths


class RouterConfig(_Strict):
    kind: Literal["linear", "mlp"] = Field("linear", description="Router head over pooled backbone features.")
    # Defaults: middle layers carry more linearly readable task information than the last one, which
    # is shaped for the next token, and the last token (where the answer starts) routed held-out
    # prompts better than the final layer's mean (bench/RESULTS.md: "dylora_moe with the new router
    # features"). bench/router_features compares poolings and depths.
    pooling: Literal["mean", "last"] = Field("last", description="Router features: the backbone's hidden states averaged over the prompt's tokens, or at its last token (where the answer starts).")
    depth: float | list[float] = Field(0.4, description="Router features come from this fraction of the backbone's layers (1.0: the final output; 0.4: after 40% of the layers); a list of fractions concatenates the features of each, every block normalised on its own.")
    lr: float = Field(1e-2, gt=0, description="Router learning rate (Adam).")
    steps_per_chunk: int = Field(10, ge=0, description="Router updates on each chunk's features.")
    refit_steps: int = Field(100, ge=0, description="After each chunk's updates, full-batch router updates on every stored feature of every expert (the replay memory), so the router stays near a jointly trained one; 0: chunk updates only.")
    feature_alpha: float = Field(0.5, ge=0, lt=1, description="Share of each router batch replayed from earlier experts' stored features.")
    capacity_per_expert: int = Field(64, gt=0, description="Stored features per expert (reservoir).")
    maturity_threshold: float = Field(0.5, ge=0, le=1, description="Hybrid policy: inputs whose top expert's maturity is at least this are served by their top-k experts alone, others by the dense mix.")
    top_k: int = Field(1, gt=0, description="Experts that serve an input sparsely.")
    mixture_lr: float = Field(1e-3, gt=0, description="experts.training: dense_to_sparse: the rate (AdamW, no weight decay) at which the task loss's gradient through the mixture moves the router, in the experts' optimizer.")
    mature_steps: int = Field(20, gt=0, description="Steps an expert trains before it counts as mature (with a flat validation trend).")
    eval_examples: int = Field(40, ge=0, description="Held-out prompts per task on which routing accuracy is measured (the router alone reads them, so more than the generation evaluation's few are cheap); 0 = the evaluation's own examples.")

    @field_validator("depth")
    @classmethod
    def _depths_in_range(cls, v):
        relative_depths(v)
        return v


class PhaseConfig(_Strict):
    lr: float = Field(..., gt=0, description="Learning rate of the phase (absolute, not a multiplier).")
    steps: int = Field(0, ge=0, description="Steps of the expert spent in this phase (seeding only).")
    shape: Literal["wsd", "cyclic", "constant"] = Field("wsd", description="wsd: warmup, stable, then a decay to the consolidation rate; cyclic: triangular cycles between the two rates.")
    warmup_steps: int = Field(2, ge=0)
    decay_fraction: float = Field(0.3, gt=0, le=1, description="wsd: share of the seeding steps spent decaying.")
    cycles: int = Field(2, gt=0, description="cyclic: cycles over the seeding steps.")


class ValidationConfig(_Strict):
    holdout: int = Field(0, ge=0, description="Examples of every chunk an expert trains on that it does not train on: its own held-out validation set, read after each of its training rounds; 0 = off (maturity from steps alone).")
    capacity: int = Field(8, gt=0, description="Held-out examples kept per expert (the first ones: the set stays fixed once full, so successive losses compare).")
    trend_window: int = Field(1, gt=0, description="Training rounds whose relative change of held-out loss (on the same examples before and after the round) are averaged into the trend.")
    flat_tolerance: float = Field(0.02, gt=0, description="Relative held-out loss drop per round still counted as learning: maturity's stability is 1 - drop / flat_tolerance (clipped), 0 until trend_window rounds were measured.")
    loss_floor: float = Field(0.01, ge=0, description="Held-out loss (nats per token) below which a drop is read relative to this floor, not to the loss: an expert that already predicts its held-out labels almost surely (1e-4) is not 'still learning' when that falls by a third.")


class MergeConfig(_Strict):
    method: Literal["none", "ties", "dare_ties", "dare_linear"] = Field("none", description="Merge two converged experts into one with this PEFT combination (none = never merge).")
    similarity: float = Field(0.95, ge=-1, le=1, description="Profiles converged: the similarity of the two experts' signal profiles is at least this.")
    criterion: Literal["output_kl", "heldout_gain", "merged_gain"] = Field(
        "output_kl", description="What says two experts (profiles alike) do one job: output_kl = their next-token distributions "
                                 "agree (max_output_kl); heldout_gain = each does the other's job (min_transfer), read from "
                                 "held-out losses, so two experts of one skill that moved their outputs by different amounts "
                                 "still merge; merged_gain = the merge is tried and kept only if the merged expert does both "
                                 "jobs (min_transfer of each one's own held-out gain).")
    max_output_kl: float = Field(0.05, ge=0, description="Outputs converged: the mean per-token symmetric KL divergence of the two experts' next-token distributions on their held-out examples is at most this (nats).")
    min_transfer: float = Field(0.5, gt=0, description="heldout_gain: on each expert's held-out examples, the other lowers the backbone's mean loss by at least this share of what the expert itself does (1: as well as the expert; 0 or less: no better than the backbone, a different skill); merged_gain: the merged expert does, on each one's held-out examples.")
    density: float = Field(1.0, gt=0, le=1, description="TIES/DARE density: share of each expert's delta kept (1.0: nothing trimmed or dropped).")


class PruneConfig(_Strict):
    unused_chunks: int = Field(0, ge=0, description="Prune an expert that was no chunk input's top router choice and trained on nothing for this many chunks in a row (its router class removed); 0 = never prune.")


class IndexConfig(_Strict):
    kind: Literal["exact", "hnsw"] = Field("hnsw", description="How novelty finds the experts a chunk is compared with in full: exact = every expert; hnsw = an approximate-nearest-neighbour index (hnswlib) over the profiles' embedding and gradient parts, once the pool has exact_below experts.")
    exact_below: int = Field(32, gt=0, description="Below this many experts every expert is compared (exact search) whatever the kind.")
    candidates: int = Field(8, gt=0, description="Experts the index returns for the full similarity (embedding, gradient and context).")
    ef: int = Field(64, gt=0, description="hnswlib's ef (search breadth) at query and construction.")
    m: int = Field(16, gt=1, description="hnswlib's M (links per node).")


class ExpertsConfig(_Strict):
    """The DyLoRA-MoE skill lifecycle: an unlabelled stream of chunks, novelty -> new expert -> seed ->
    consolidate, and a router trained beside the experts (skillstream/experts/lifecycle.py)."""
    chunk_size: int = Field(16, gt=0, description="Examples per chunk of the stream (the learner sees chunks, never task labels).")
    chunk_epochs: float = Field(1.0, gt=0, description="Passes over each chunk's examples.")
    prefix: str = Field("expert_", description="Experts are named PREFIX0, PREFIX1, ... in creation order.")
    max_experts: int = Field(8, gt=0, description="At most this many experts; beyond it the best match is reused.")
    fork: bool = Field(False, description="Warm-start a new expert from the best-matching one instead of a fresh LoRA.")
    oracle: bool = Field(True, description="At the end, also score every task with its skill's expert forced (the oracle choice) beside the router's choice; false skips that second evaluation (results.json oracle is then empty).")
    score: Literal["skills", "end"] = Field("skills", description="When the evaluation suite is scored: skills = before the stream and after each skill's last chunk (the accuracy matrix: AvgAcc, BWT, FWT); end = before the stream and after its last chunk only (AvgAcc at the end; BWT and FWT are null), for an evaluation too costly to run after every skill.")
    training: Literal["hard", "dense_to_sparse"] = Field("hard", description="hard: a chunk trains the one expert its decision names, alone; dense_to_sparse: a chunk trains the router and every expert through the router's weighted mixture (dense while an input's top expert is immature, its top-k with a load-balancing term once that expert is mature), so the router learns from the task loss.")
    load_balance: float = Field(0.01, ge=0, description="dense_to_sparse: weight of the Switch/GShard load-balancing term, n_experts * sum_i (share of inputs delegated to expert i) * (mean router probability of i), over the inputs delegated sparsely.")
    novelty: NoveltyConfig = Field(default_factory=NoveltyConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    seeding: PhaseConfig = Field(default_factory=lambda: PhaseConfig(lr=1e-3, steps=16))
    consolidation: PhaseConfig = Field(default_factory=lambda: PhaseConfig(lr=2e-4, shape="constant"))
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Each expert's held-out examples: maturity from the trend of its loss on them, and the outcomes the calibrated decider learns from.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Merging two experts whose profiles and outputs have converged.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Pruning experts no input is routed to.")
    index: IndexConfig = Field(default_factory=IndexConfig, description="Search over the expert profiles for novelty decisions.")


class GenerationConfig(_Strict):
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0


class RecipeConfig(_Strict):
    name: str = Field(..., description="Run name; the default run directory is runs/NAME.")
    description: str = ""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description="LoRA adapter; null trains the model's own weights (needs model.freeze_backbone: false).")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageConfig] = Field(default_factory=list, description="Stages run in order; empty means one stage 'main' from data/train.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    objective: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="lm"),
                                       description="Training objective: lm/sft, or a registered/importable one.")
    plugins: list[ComponentConfig] = Field(default_factory=list, description="Plugins attached to the engine's hooks.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers, through Accelerate's: tensorboard (RUN_DIR/tb), mlflow (the server of "
                    "MLFLOW_TRACKING_URI; experiment = the recipe's name), wandb (WANDB_MODE, WANDB_DIR apply; "
                    "project = the recipe's name). Each gets every metrics.jsonl number, the evaluations, alerts, "
                    "samples and decisions; mlflow and wandb also the run's files. [] for none.")
    smoke: bool = Field(False, description="Run every stage for a few steps on a few examples (wiring check).")
    stage: str = Field("all", description="Which stages run: 'all' (default), or the name of one stage (e.g. muse's sft, "
                                          "pairs or dpo), which then starts from `init_from` (else from the bare model) and "
                                          "is scored on the evaluation suite a full run uses.")
    init_from: str | None = Field(None, description="A finished run directory to start from: its final expert adapter(s) "
                                                    "(experts/NAME) or model (model/) are loaded before anything else, and "
                                                    "files that stages this run skips would have built (e.g. pairs.jsonl) are "
                                                    "copied from it instead of built again. Same model and LoRA shape required.")
    experts: ExpertsConfig | None = Field(None, description="Learn the stages as an unlabelled stream of chunks with a growing pool of LoRA experts and a router (DyLoRA-MoE).")
    _resolved: tuple | None = PrivateAttr(None)  # resolved_stages(), once

    @field_validator("model", "objective", mode="before")
    @classmethod
    def _shorthand(cls, v):  # `model: tiny` is short for `model: {name: tiny}`
        return _component_shorthand(v)

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugin_shorthand(cls, v):
        return [_component_shorthand(x) for x in v] if isinstance(v, list) else v

    def _stream_stages(self) -> list[StageConfig]:
        return _stream_stages_of(self) if self.data.stream else []

    def resolved_stages(self) -> tuple["ResolvedStage", ...]:
        """(name, data, train, objective) per stage, with stage overrides applied and smoke sizes;
        resolved once per recipe (stream folders read, checks run), then the same stages every call."""
        if self._resolved is None:
            self._resolved = tuple(self._resolve_stages())
        return self._resolved

    def stages_with_own_data(self) -> list[int]:
        """Indices of the stages that have their own `data` block: they do not read the recipe's."""
        return [i for i, st in enumerate(self.stages) if st.data is not None]

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "RecipeConfig":
        copy = super().model_copy(update=update, deep=deep)
        copy._resolved = None  # the copy resolves its own stages from its own fields
        return copy

    def _resolve_stages(self) -> list["ResolvedStage"]:
        if any(st.train.get("bf16", self.train.bf16) != self.train.bf16 for st in self.stages):
            raise UserError("stages[].train.bf16: precision is set once per run, in train.bf16")
        raw = self._stream_stages() or self.stages or [StageConfig(name="main")]
        out = []
        for st in raw:
            data = (st.data or self.data).model_copy(deep=True)
            try:
                train = TrainConfig(**{**self.train.model_dump(), **st.train})
            except ValidationError as e:
                raise UserError(f"stages[{st.name}].train: {_first_error(e)}") from None
            if self.smoke:
                train = train.model_copy(update=dict(steps=min(train.steps, 3), batch_size=min(train.batch_size, 2),
                                                     grad_accum=1, warmup_steps=1, log_every=1, checkpoint_every=2))
                data = data.model_copy(update={
                    "train": [src.model_copy(update={"limit": min(src.limit or 8, 8)}) for src in data.train],
                    "eval": [task.model_copy(update={"limit": min(task.limit or 4, 4),
                                                     "max_new_tokens": min(task.max_new_tokens, 16)})
                             for task in data.eval]})
            out.append(ResolvedStage(st.name, data, train, st.objective or self.objective))
        i = self._pick([st.name for st in out])
        if i is None:
            return out
        # scored on the suite of a full run (a stage's data may replace it)
        return [out[i]._replace(data=out[i].data.model_copy(update={"eval": out[0].data.eval}))]

    def _pick(self, names: list[str]) -> int | None:
        """Index of the stage `stage` names (None for 'all'); an unknown name is a UserError."""
        if self.stage == "all":
            return None
        if self.stage not in names:
            raise UserError(f"stage {self.stage!r}: recipe {self.name!r} has no such stage "
                            f"(stages: {', '.join(names)}; or all)")
        return names.index(self.stage)


class ResolvedStage(NamedTuple):
    name: str
    data: DataConfig
    train: TrainConfig
    objective: ComponentConfig


def _stream_stages_of(recipe: "RecipeConfig") -> list[StageConfig]:
    from .data.stream import read_stream

    d = recipe.data
    tasks = read_stream(d.stream)
    evals = [EvalTaskConfig(name=t.name, source=str(t.folder), instruction=t.instruction, limit=d.stream_test_limit,
                            metric=d.stream_protocols[0], also=d.stream_protocols[1:],
                            max_new_tokens=d.stream_max_new_tokens, invalid_labels=d.invalid_labels) for t in tasks]
    stages = []
    for t in tasks:
        data = d.model_copy(update={"stream": None, "eval": evals, "train": [
            SourceConfig(source=str(t.folder), instruction=t.instruction, limit=d.stream_train_limit,
                         invalid_labels=d.invalid_labels)]})
        stages.append(StageConfig(name=t.name, data=data))
    return stages


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4); the value is read as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_override(raw: dict, key: str, value: Any) -> None:
    """Set raw[a][b][c] for 'a.b.c'; a number indexes a list ('data.train.0.limit')."""
    node: Any = raw
    parts = key.split(".")
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise UserError(f"--set {key}: '{p}' is not an index of a list of {len(node)}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                nxt = node.setdefault(p, {})
                if not isinstance(nxt, (dict, list)):
                    raise UserError(f"--set {key}: '{p}' is not a section")
                node = nxt
        else:
            raise UserError(f"--set {key}: '{parts[i - 1]}' is not a section")


def find_recipe(recipe: str | Path) -> Path:
    p = Path(recipe)
    bundled = RECIPES_DIR / f"{recipe}.yaml"
    names = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    if p.is_dir():  # a folder is never a recipe; a bundled name wins over a folder of that name (runs/NAME)
        if p.suffix not in (".yaml", ".yml") and bundled.is_file():
            return bundled
        hint = f"; its recipe is {p / 'config.yaml'}" if (p / "config.yaml").is_file() else ""
        raise UserError(f"recipe {str(p)!r}: is a folder, not a recipe file (expected a .yaml file "
                        f"or a bundled name: {names}){hint}")
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"recipe {str(p)!r}: file not found")
        return p
    if not bundled.is_file():
        raise UserError(f"recipe {recipe!r}: not a file and not a bundled recipe (bundled: {names})")
    return bundled


def load_recipe(recipe: str | Path | dict, overrides: dict[str, Any] | None = None, smoke: bool = False) -> RecipeConfig:
    """Read a recipe (bundled name, path or dict), apply dotted overrides, validate."""
    if isinstance(recipe, dict):
        raw, where = copy.deepcopy(recipe), "recipe"
    else:
        path = find_recipe(recipe)
        where = str(path)
        try:
            raw = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected a mapping of recipe keys at the top level")
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value)
    if smoke:
        raw["smoke"] = True
    try:
        cfg = RecipeConfig(**raw)
    except ValidationError as e:
        raise UserError(f"{where}: {_first_error(e)}") from None
    _check_curriculum_steps(cfg, where)
    cfg.resolved_stages()  # resolved here, once: a bad stream folder or stage name stops before any work
    return cfg


def _check_curriculum_steps(cfg: RecipeConfig, where: str) -> None:
    """A curriculum (explicit `stages`) whose stages cover zero optimizer steps in all trains nothing: bad input."""
    if not cfg.stages or cfg.data.stream or getattr(cfg, "experts", None) is not None:
        return
    steps = {st.name: st.train.get("steps", cfg.train.steps) for st in cfg.stages}
    if all(type(n) is int for n in steps.values()) and sum(max(n, 0) for n in steps.values()) == 0:
        per_stage = ", ".join(f"{name}: {n}" for name, n in steps.items())
        raise UserError(f"{where}: the curriculum's stages cover zero training steps ({per_stage}); "
                        f"set train.steps (or a stage's train.steps) to at least 1")


def recipe_to_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def list_recipes() -> list[tuple[str, str]]:
    out = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(read_text(p)) or {}
        out.append((p.stem, str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""))
    return out
