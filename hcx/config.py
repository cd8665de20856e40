"""Recipes: typed schema, ``base:`` inheritance and ``key=value`` overrides.

A recipe is YAML validated by the pydantic models below. ``load_recipe`` merges
the ``base:`` chain, applies command-line overrides, and validates everything,
including cross-field rules such as "heads divisible by tp", *before* any
process is started. Every error names the key and where it was set
(``file:line`` or the override on the command line).
"""

from __future__ import annotations

import copy
import math
import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)

from hcx.errors import HcxError

M = TypeVar("M", bound=BaseModel)


class RecipeError(HcxError, ValueError):
    """A recipe that cannot run. The message names the key and its origin."""


class Strict(BaseModel):
    """A config section: unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(Strict):
    """RoPE frequency scaling for long contexts: Llama 3.1's ``llama3`` rule (the one
    megatron-core's ``rope_scaling`` implements; here with all four of its parameters)."""

    type: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(default=1.0, gt=0)
    high_freq_factor: float = Field(default=4.0, gt=0)
    original_max_position_embeddings: int = Field(default=8192, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be above low_freq_factor")
        return self


# Hugging Face architectures a checkpoint can come from and 'hcx export' writes
# (hcx.interop.families); "hcx" is a model trained here (exported as Llama).
MODEL_FAMILIES = ("hcx", "llama", "mistral", "qwen2", "qwen3", "exaone")


class ModelConfig(Strict):
    """Llama-style decoder (the HyperCLOVA X architecture family), with the options of
    the open families ``hcx import`` reads (QKV biases, QK-norm, RoPE scaling, head size)."""

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0, description="SwiGLU inner size")
    num_attention_heads: int = Field(gt=0)
    num_query_groups: int | None = Field(default=None, gt=0, description="GQA groups; None = MHA")
    vocab_size: int | None = Field(default=None, gt=0, description="None = from the tokenizer")
    max_position_embeddings: int = Field(default=4096, gt=0)
    rope_base: float = Field(default=10000.0, gt=0)
    norm_epsilon: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(default=0.02, gt=0)
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    head_dim: int | None = Field(default=None, gt=0, description="attention head size; "
                                 "None = hidden_size / num_attention_heads")
    qkv_bias: bool = Field(default=False, description="biases on the query/key/value "
                           "projections (Qwen2)")
    qk_norm: bool = Field(default=False, description="RMSNorm of each query and key head "
                          "before RoPE (Qwen3)")
    rope_scaling: RopeScaling | None = None
    family: Literal[MODEL_FAMILIES] = Field(  # type: ignore[valid-type]
        default="hcx", description="the Hugging Face architecture the weights were imported "
        "from, which 'hcx export' writes; hcx = trained here (exported as Llama)")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """The size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


class ParallelConfig(Strict):
    tp: int = Field(default=1, gt=0, description="tensor-parallel size")
    pp: int = Field(default=1, gt=0, description="pipeline-parallel size")
    cp: int = Field(default=1, gt=0, description="context-parallel size: each sequence split "
                    "over cp GPUs (megatron + Transformer Engine ring attention; CUDA only)")
    dp: int = Field(default=1, gt=0, description="data-parallel size")
    sequence_parallel: bool = False
    distributed_optimizer: bool = Field(
        default=True,
        description="megatron's distributed optimizer (optimizer state sharded over DP, "
                    "ZeRO-1). On by default at every DP size so that checkpoints move between "
                    "any layouts; megatron's plain optimizer saves in another format.",
    )
    overlap_grad_reduce: bool = Field(
        default=False, description="megatron DDP: reduce (or reduce-scatter) each gradient "
        "bucket as soon as its backward is done, overlapping communication with the rest of "
        "the backward pass")
    overlap_param_gather: bool = Field(
        default=False, description="distributed optimizer: all-gather the updated parameters "
        "bucket by bucket during the next forward pass instead of after the optimizer step "
        "(needs distributed_optimizer and overlap_grad_reduce)")
    bucket_size: int | None = Field(
        default=None, gt=0, description="parameters per gradient/parameter bucket; None = "
        "megatron's default (max(40M, 1M x dp) with overlap, one bucket without)")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


class TokenizerConfig(Strict):
    """Where token ids come from. ``bytes`` is UTF-8 bytes plus specials (no file needed);
    ``path`` is a SentencePiece ``.model`` or a Hugging Face tokenizer directory."""

    kind: Literal["bytes", "sentencepiece", "hf"] = "bytes"
    path: str | None = None

    @model_validator(mode="after")
    def _path_needed(self):
        if self.kind != "bytes" and not self.path:
            raise ValueError(f"tokenizer kind {self.kind!r} needs 'path'")
        return self


class DataSource(Strict):
    """One pretraining source: a megatron indexed dataset built elsewhere (``prefix``,
    the ``.bin/.idx`` pair without extension) or raw documents (``path``) that
    ``hcx data prepare`` cleans and tokenizes (``hcx pretrain`` runs it when needed).

    ``path`` is a file, a directory, a glob, ``hf://OWNER/NAME`` (a Hub dataset) or
    ``python://stdlib``; ``data://`` paths resolve against the data root. Formats:
    JSONL, Parquet, plain text (one document per blank-line block), source files
    (one document per file)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    prefix: str | None = None
    path: str | None = None
    text_field: str = Field(default="text", description="field holding the text (JSONL, "
                            "Parquet, Hub)")
    weight: float = Field(default=1.0, gt=0, description="share in the training blend")
    language: Literal["ko", "en", "code", "any"] = Field(
        default="any", description="for the language filter and the stats; 'any' = "
        "detected per document, no language filter")
    format: Literal["auto", "jsonl", "text", "file", "parquet"] = "auto"
    include: str = Field(default="*", description="file-name glob inside a directory")
    exclude: list[str] = Field(default_factory=list, description="globs left out, relative "
                               "to the directory")
    hub_config: str | None = None
    hub_split: str = "train"
    fim: bool | None = Field(default=None, description="fill-in-the-middle at "
                             "data.prepare.fim.rate; None = on for language 'code'")

    @model_validator(mode="after")
    def _one_location(self):
        if (self.prefix is None) == (self.path is None):
            raise ValueError("give exactly one of 'prefix' (prepared .bin/.idx) or 'path' (raw file)")
        return self

    @property
    def uses_fim(self) -> bool:
        return self.language == "code" if self.fim is None else self.fim


class FilterSettings(Strict):
    """Document filters (see hcx.data.corpus.clean.FilterConfig for the measures)."""

    min_chars: int = Field(default=20, ge=0)
    max_chars: int = Field(default=1_000_000, gt=0)
    max_duplicate_line_fraction: float = Field(default=0.3, gt=0, le=1)
    max_top_char_ngram_fraction: float = Field(default=0.2, gt=0, le=1)
    min_language_fraction: float = Field(default=0.5, ge=0, le=1)


class DedupSettings(Strict):
    exact: bool = True
    near: bool = Field(default=True, description="MinHash LSH near-duplicates")
    threshold: float = Field(default=0.8, gt=0, lt=1, description="estimated Jaccard of "
                             "token 5-gram sets above which a document is a near-duplicate")
    num_perm: int = Field(default=128, gt=0)
    ngram: int = Field(default=5, gt=0)


class DecontamSettings(Strict):
    eval_dir: str = Field(default="data://eval", description="one folder per benchmark of "
                          "JSONL files; every string field of every record is indexed")
    benchmarks: list[str] = Field(default_factory=list, description="folder names; [] = all")
    ngram: int = Field(default=13, gt=0, description="words in a shared n-gram (GPT-3's 13)")
    action: Literal["drop", "report"] = "drop"


class FimSettings(Strict):
    rate: float = Field(default=0.5, ge=0, le=1, description="share of code documents")
    spm_rate: float = Field(default=0.5, ge=0, le=1, description="share of FIM documents in "
                            "suffix-prefix-middle order (the rest prefix-suffix-middle)")
    random_split_rate: float = Field(default=0.5, ge=0, le=1, description="share cut at "
                                     "random points (the rest at fixed thirds, as HCX)")


class ExecutorSettings(Strict):
    """Where ``hcx data prepare``'s datatrove tasks run (see docs/data.md)."""

    kind: Literal["local", "slurm", "ray"] = Field(
        default="local", description="local: data.prepare.workers processes here; slurm: "
        "job arrays through sbatch; ray: an existing Ray cluster (address) or a local one")
    shard_mb: float | None = Field(default=None, gt=0, description="MB of input per task "
                                   "(JSONL files are cut at line boundaries; other files are "
                                   "whole); None = the corpus over 32 tasks, 2-512 MB each")
    address: str | None = Field(default=None, description="ray: the cluster address "
                                "(ray://host:10001 or host:6379); None = start a local one")
    partition: str | None = Field(default=None, description="slurm: partition")
    account: str | None = Field(default=None, description="slurm: account")
    time: str = Field(default="24:00:00", description="slurm: time limit per job")
    cpus_per_task: int = Field(default=1, ge=1, description="slurm/ray: CPUs per task")
    tasks_per_job: int = Field(default=1, ge=1, description="slurm/ray: tasks run one after "
                               "another in one array job or Ray actor (fewer, longer jobs)")
    mem_per_cpu_gb: float = Field(default=2.0, gt=0, description="slurm/ray: memory per CPU")
    sbatch_options: list[str] = Field(default_factory=list, description="slurm: extra "
                                      "#SBATCH lines, e.g. --qos=high")
    grace: int = Field(default=120, ge=0, description="slurm: a task still running this "
                       "many seconds before the time limit gets USR1 and requeues its job "
                       "(it restarts; finished tasks are kept); 0 = no requeue")


class PrepareConfig(Strict):
    """How ``hcx data prepare`` turns raw sources into indexed datasets."""

    output_dir: str | None = Field(default=None, description="None = <cache_dir>/prepared")
    workers: int = Field(default=2, ge=1, description="tasks run at once (local and ray)")
    executor: ExecutorSettings = ExecutorSettings()
    filters: FilterSettings = FilterSettings()
    dedup: DedupSettings = DedupSettings()
    pii: bool = Field(default=True, description="mask e-mail local parts, phone numbers, "
                      "Korean resident registration numbers")
    decontaminate: DecontamSettings | None = Field(default=None, description="None = off")
    fim: FimSettings = FimSettings()
    skip_bad: bool = Field(default=False, description="count bad records instead of stopping")
    seed: int = 1234


class DataConfig(Strict):
    sources: list[DataSource] = Field(min_length=1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_length: int = Field(gt=0)
    split: str = "98,2,0"
    cache_dir: str | None = Field(default=None, description="None = <output_dir>/data_cache")
    prepare: PrepareConfig = PrepareConfig()
    eval_every: int = Field(default=0, ge=0, description="validation loss every N steps; 0 = off")
    eval_batches: int = Field(default=2, gt=0)


class FP8Config(Strict):
    """Transformer Engine's FP8 training (megatron's ``fp8`` and ``fp8_recipe``)."""

    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = Field(
        default="tensorwise", description="scaling: delayed (amax history), tensorwise "
        "(current per-tensor scale), blockwise (1x128/128x128 blocks, Hopper), mxfp8 "
        "(32-element blocks, Blackwell)")
    format: Literal["e4m3", "hybrid"] = Field(
        default="hybrid", description="e4m3 everywhere, or hybrid: e4m3 forward, e5m2 "
        "gradients")
    amax_history_len: int = Field(default=1024, gt=0, description="delayed scaling only")
    amax_compute_algo: Literal["max", "most_recent"] = Field(
        default="max", description="delayed scaling only")


class TrainConfig(Strict):
    steps: int = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(default=1, gt=0)
    lr: float = Field(gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = Field(default=None, gt=0, description="None = train.steps")
    weight_decay: float = Field(default=0.1, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    adam_eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 = off")
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    recompute: Literal["none", "selective", "full"] = Field(
        default="none", description="activation recomputation (Korthikanti et al. 2022): "
        "selective = core attention only (megatron's recompute_granularity='selective'); "
        "full = whole layers, keeping only their inputs (recompute_method, "
        "recompute_num_layers); true/false are read as full/none")
    recompute_method: Literal["uniform", "block"] | None = Field(
        default=None, description="full recomputation: uniform = checkpoint chunks of "
        "recompute_num_layers layers; block = recompute only the first recompute_num_layers "
        "layers of each pipeline stage; None = uniform")
    recompute_num_layers: int | None = Field(
        default=None, gt=0, description="full recomputation: layers per chunk (uniform) or "
        "recomputed layers per stage (block); None = 1 (uniform) or all of them (block)")
    fp8: FP8Config | None = Field(default=None, description="FP8 matmuls through "
                                    "Transformer Engine (NVIDIA Hopper or newer); None = off")

    trainable: list[str] = Field(
        default_factory=lambda: ["all"],
        description="what trains (hcx.engine.trainable): all, embeddings, input_embeddings, "
        "output_embeddings, new_embeddings, new_input_embeddings, new_output_embeddings "
        "(the rows from train.new_tokens_from), or parameter-name globs; the rest is frozen")
    new_tokens_from: int | None = Field(
        default=None, gt=0, description="the first id a vocabulary extension added ('hcx "
        "import --tokenizer' sets it): the new_* choices of train.trainable train the rows "
        "from here to the tokenizer's size")

    @field_validator("recompute", mode="before")
    @classmethod
    def _recompute_bool(cls, value):
        # Older recipes wrote recompute: true/false (full recomputation or none).
        if isinstance(value, bool):
            return "full" if value else "none"
        return value

    @field_validator("trainable", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return [value] if isinstance(value, str) else value


class CheckpointConfig(Strict):
    dir: str | None = Field(default=None, description="None = <output_dir>/checkpoints")
    save_every: int = Field(default=0, ge=0, description="0 = only at the end")
    keep_last: int = Field(default=2, gt=0)
    resume: bool = Field(default=True, description="continue from the latest complete checkpoint")
    init_from: str | None = Field(
        default=None, description="load model weights only (fresh optimizer, step 0) from "
        "a step directory or a checkpoints directory (its latest step)"
    )
    async_save: bool = Field(
        default=False, description="write checkpoints in the background (megatron-core's "
        "async save) while training continues; a save becomes 'latest' only once written "
        "and checksummed (at a later step boundary, or at the end / on SIGTERM)")
    fully_parallel_save: bool = Field(
        default=True, description="spread the writing of state replicated over "
        "data-parallel ranks across all of them (megatron's fully parallel save)")
    fully_parallel_load: bool = Field(
        default=False, description="each data-parallel rank reads a share of the "
        "replicated state and the ranks exchange it (fewer reads of shared storage, "
        "more memory and communication during the load)")


class WandbConfig(Strict):
    """Weights & Biases (``pip install hcx[wandb]``): the run's scalars and resolved recipe."""

    project: str = "hcx"
    entity: str | None = None
    name: str | None = Field(default=None, description="run name; None = the recipe's name")
    mode: Literal["online", "offline", "disabled"] = Field(
        default="offline", description="offline writes under dir (sync later with `wandb "
        "sync`), online needs a network and a login")
    dir: str | None = Field(default=None, description="None = <output_dir> (wandb/ inside)")
    tags: list[str] = Field(default_factory=list)
    group: str | None = None


class MlflowConfig(Strict):
    """MLflow (``pip install hcx[mlflow]``): the run's scalars and resolved recipe."""

    tracking_uri: str | None = Field(
        default=None, description="a server (http://...) or sqlite:///path.db (MLflow 3 "
        "refuses folder stores unless MLFLOW_ALLOW_FILE_STORE=true); None = "
        "sqlite:///<output_dir>/mlflow.db")
    experiment: str = "hcx"
    run_name: str | None = Field(default=None, description="None = the recipe's name")
    tags: dict[str, str] = Field(default_factory=dict)


class LoggingConfig(Strict):
    peak_tflops: float | None = Field(
        default=None, gt=0, description="per-device peak for MFU; None = known GPU table or off"
    )
    tensorboard: bool = True
    progress: bool = Field(default=True, description="progress bar on the console")
    log_every: int = Field(default=10, gt=0, description="console line every N steps")
    wandb: WandbConfig | None = Field(default=None, description="None = off")
    mlflow: MlflowConfig | None = Field(default=None, description="None = off")


class SFTConfig(Strict):
    """Supervised fine-tuning (``hcx sft``): ``data.sources`` are chat conversations."""

    messages_field: str = Field(default="messages", description="the field holding the "
                                "list of {role, content} messages")
    packing: bool = Field(default=True, description="several conversations per sequence, "
                          "attention isolated between them; false = one per sequence, "
                          "batches of similar lengths")
    skip_bad: bool = Field(default=False, description="count bad records instead of stopping")


class FDPGConfig(Strict):
    """f-DPG (``align.method: fdpg``): approximate the target EBM
    p(x) ∝ a(x)·b(x) (``constraint``) or a(x)·exp(r(x)/beta) (``reward``) on-policy."""

    divergence: Literal["forward_kl", "reverse_kl", "js", "tv"] = "reverse_kl"
    scorer: str = Field(description="what scores a sample: 'module:function' (a Python "
                        "callable taking (prompts, completions) lists of strings and "
                        "returning floats) or 'reward-model:PATH' (an hcx reward-model "
                        "checkpoint)")
    target: Literal["constraint", "reward"] = Field(
        default="constraint", description="constraint: the scorer returns b(x) in {0, 1}; "
        "reward: it returns r(x) and the target is a(x) exp(r(x) / align.beta)")
    samples_per_prompt: int = Field(default=1, gt=0)
    max_new_tokens: int = Field(default=32, gt=0)
    baseline_decay: float = Field(default=0.9, ge=0, lt=1, description="moving-average "
                                  "baseline of the pseudo-reward")
    prompts_field: str = Field(default="prompt", description="prompt field in the source "
                               "rows (a string or a list of chat messages)")
    chat: bool = Field(default=True, description="wrap string prompts as one user turn "
                       "and add the generation prompt")


class OnlineConfig(Strict):
    """On-policy policy gradient (``align.method: grpo`` or ``rloo``): sample
    ``samples_per_prompt`` completions of each prompt from the current policy, reward them,
    and step on the clipped policy-gradient loss (docs/alignment.md, "GRPO and RLOO")."""

    reward: str | None = Field(default=None, description="what rewards a completion "
                               "(grpo, rloo, jbond: required; self_judge: reported, or the "
                               "judge with align.self_judge.judge=reward): 'math', 'code', "
                               "'judge:MODEL' (self, a checkpoint, an HF dir or an http(s) "
                               "endpoint), 'reward-model:PATH' or 'module:function' (a Python "
                               "callable taking (prompts, completions) lists of strings and "
                               "returning floats)")
    samples_per_prompt: int = Field(default=4, ge=2, description="K, the group size: "
                                    "completions sampled per prompt")
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="clip range below 1")
    epsilon_high: float | None = Field(default=None, gt=0, description="clip range above "
                                       "1; None = epsilon (DAPO's clip-higher: 0.28)")
    beta: float = Field(default=0.0, ge=0, description="KL coefficient against the "
                        "reference model (0: no reference model in memory); rloo puts it in "
                        "the reward, grpo in the loss")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        default="dapo", description="grpo: how token losses are averaged (rloo's loss is "
        "per sequence)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="grpo: divide advantages by the group's (or the "
        "batch's) reward standard deviation, or not (Dr. GRPO)")
    normalize_advantages: bool = Field(default=False, description="rloo: standardise the "
                                       "advantages over the batch")
    reward_clip: tuple[float, float] | None = Field(default=None, description="clamp raw "
                                                     "rewards into [low, high]")
    normalize_rewards: bool = Field(default=False, description="whiten rewards with running "
                                    "statistics (kept in checkpoints)")
    normalize_clip: float | None = Field(default=5.0, gt=0, description="with "
                                         "normalize_rewards: clip at +-N sigma (None: no clip)")
    passes: int = Field(default=1, ge=1, description="optimizer steps on each rollout batch "
                        "(old-policy log-probs and the clipped ratio make the later ones "
                        "off-policy-safe)")
    unlikelihood_weight: float = Field(default=0.0, ge=0, description="weight of the "
                                       "repetition unlikelihood term (0: off)")
    unlikelihood_ngram: int = Field(default=4, gt=0)
    prompts_field: str = Field(default="prompt", description="prompt field in the source "
                               "rows (a string or a list of chat messages; a list ending with "
                               "an assistant turn loses it, and that turn is the answer)")
    chat: bool = Field(default=True, description="wrap string prompts as one user turn "
                       "and add the generation prompt")
    answer_field: str = Field(default="answer", description="math: the record's reference "
                              "answer (GSM8K's '... #### 42' or a number)")
    tests_field: str = Field(default="test", description="code: the record's tests (Python "
                             "source, or a list of assert lines)")
    code_timeout_s: float = Field(default=10.0, gt=0)
    code_workers: int = Field(default=2, gt=0)
    judge_prompts: str = Field(default="data://eval/mt_bench_en/judge_prompts.jsonl",
                               description="judge: FastChat-format judge prompts")
    judge_prompt: str = Field(default="single-v1", description="judge: the single-answer "
                              "prompt's name in judge_prompts")
    judge_max_new_tokens: int = Field(default=256, gt=0)
    generation_batch_size: int = Field(default=64, gt=0, description="sequences per call "
                                       "of the generation engine")


class JBondConfig(Strict):
    """J-BOND (``align.method: jbond``, Sessa et al. 2024): distil the Best-of-N
    distribution of a moving EMA anchor into the policy by the Jeffreys divergence.
    Sampling and the reward come from ``align.online`` (reward, max_new_tokens, temperature,
    top_p, prompts); docs/alignment.md, "J-BOND"."""

    anchor_samples: int = Field(default=2, ge=1, description="N: completions the anchor "
                                "samples per prompt (the policy samples one)")
    eta: float = Field(default=0.02, gt=0, le=1, description="the anchor's EMA rate: after "
                       "each step anchor <- (1 - eta) anchor + eta policy")
    beta: float = Field(default=0.5, ge=0, le=1, description="Jeffreys weight of the forward "
                        "KL (NLL of the anchor's best sample); 0 = backward KL only")
    kl_coef: float = Field(default=1.0, gt=0, description="weight of KL(policy || anchor) in "
                           "the backward term (1 = 1/(N-1) for N = 2, the BOND derivation)")
    penalty: float = Field(default=math.log(16.0), ge=0, description="the J-BOND reward of "
                           "a policy sample worse than every anchor sample (others get 0)")
    gamma: float = Field(default=0.0, ge=0, description="extra KL(policy || reference) "
                         "weight in the backward term (needs reference_kl)")
    reference_kl: bool = Field(default=True, description="score the policy's samples under "
                               "the frozen initial model too (the kl_ref metric, gamma); "
                               "false keeps that third model out of memory")


class SelfJudgeConfig(Strict):
    """On-policy self-judged DPO (``align.method: self_judge``, SELF-JUDGE, Lee et al. 2024):
    the policy samples two completions of each prompt, a pairwise judge (by default the
    policy itself, with its current weights) prefers one in both orders, and DPO
    (``align.beta``, ``align.label_smoothing``) trains on the judged pair against the
    reference model. Sampling comes from ``align.online`` (max_new_tokens, temperature,
    top_p, prompts); docs/alignment.md, "SELF-JUDGE"."""

    judge: str = Field(default="self", description="who prefers one completion of a pair: "
                       "'self' (the policy being trained, JSFT-trained to judge), an hcx "
                       "checkpoint, a Hugging Face directory, an http(s) endpoint, or "
                       "'reward' (align.online.reward's scores: the higher wins)")
    judge_prompts: str = Field(default="data://eval/mt_bench_en/judge_prompts.jsonl",
                               description="FastChat-format judge prompts (as hcx data jsft "
                               "wrote the judgments the model learnt)")
    judge_prompt: str = Field(default="pair-v2", description="the pairwise prompt's name")
    judge_max_new_tokens: int = Field(default=32, gt=0, description="tokens of a judge's "
                                      "reply (a JSFT judge answers [[A]] or [[B]])")


class AlignConfig(Strict):
    """Preference alignment (``hcx align``): the method and its options."""

    method: Literal["dpo", "ipo", "kto", "bco", "orpo", "reward", "fdpg", "grpo",
                    "rloo", "jbond", "self_judge"] = "dpo"
    beta: float = Field(default=0.1, gt=0, description="DPO/IPO/KTO/BCO: the KL "
                        "coefficient; ORPO: the odds-ratio weight (lambda); f-DPG reward "
                        "target: the temperature")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="DPO: assumed "
                                   "rate of flipped labels (conservative DPO)")
    desirable_weight: float = Field(default=1.0, gt=0, description="KTO")
    undesirable_weight: float = Field(default=1.0, gt=0, description="KTO")
    kto_kl: bool = Field(default=True, description="KTO: estimate the reference point "
                         "from mismatched completions (false = z0 = 0)")
    bco_udm: bool = Field(default=False, description="BCO: underlying-distribution "
                          "matching (re-weight undesirable examples by a prompt classifier)")
    reference: str | None = Field(default=None, description="reference model checkpoint; "
                                  "None = checkpoint.init_from")
    reference_logps: Literal["precomputed", "live"] = Field(
        default="precomputed", description="precomputed: one pass over the data before "
        "training, stored in <output_dir>/reference_logps.npz (no second model in memory); "
        "live: a frozen reference model scores every batch")
    max_prompt_length: int | None = Field(default=None, gt=0, description="keep the last N "
                                          "prompt tokens; None = whatever fits")
    held_out: int = Field(default=0, ge=0, description="examples kept out of training for "
                          "the validation pass (data.eval_every)")
    skip_bad: bool = Field(default=False, description="count bad records instead of stopping")
    center_rewards: float | None = Field(default=None, ge=0, description="reward model: "
                                         "coefficient pulling rewards towards zero mean")
    fdpg: FDPGConfig | None = None
    online: OnlineConfig | None = None
    jbond: JBondConfig | None = None
    self_judge: SelfJudgeConfig | None = None


STAGE_SECTIONS = ("sft", "align")  # sections read by one stage only


class Recipe(Strict):
    """A training run. ``sft`` and ``align`` belong to their stages: a stage's resolved
    recipe (:meth:`for_stage`) holds its own section and neither of the others."""

    name: str
    output_dir: str = Field(description="run directory: metrics, TensorBoard, checkpoints")
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sft: SFTConfig | None = None
    align: AlignConfig | None = None

    # Where each dotted key was set (file:line or an override), for messages.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="recipe")

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.dp)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def data_cache_dir(self) -> Path:
        return Path(self.data.cache_dir or Path(self.output_dir) / "data_cache")

    def where(self, key: str) -> str:
        """``file:line`` (or the override) that set ``key`` or its nearest parent."""
        return origin_of(key, self._origins, self._source)

    def for_stage(self, section: str | None) -> "Recipe":
        """This recipe as stage ``section`` reads it: that section present (defaults
        when the file has none), the other stages' sections dropped (a DPO recipe may
        inherit its SFT recipe's ``sft:`` through ``base:``)."""
        update: dict[str, Any] = {s: None for s in STAGE_SECTIONS if s != section}
        if section in STAGE_SECTIONS and getattr(self, section) is None:
            update[section] = Recipe.model_fields[section].annotation.__args__[0]()
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        for section in STAGE_SECTIONS:
            if out.get(section) is None:
                out.pop(section, None)
        return out


# --- cross-field rules ------------------------------------------------------------
# Each failed rule yields (key to blame, message); the key's origin is shown with it.


def layout_errors(r: Recipe) -> list[tuple[str, str]]:
    m, p, t = r.model, r.parallel, r.train
    errors: list[tuple[str, str]] = []

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            errors.append((key, msg))

    check(m.num_attention_heads % p.tp == 0, "parallel.tp",
          f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    check(m.num_attention_heads % m.query_groups == 0, "model.num_query_groups",
          f"model.num_query_groups={m.query_groups} does not divide "
          f"model.num_attention_heads={m.num_attention_heads}")
    check(m.query_groups % p.tp == 0, "parallel.tp",
          f"model.num_query_groups={m.query_groups} is not divisible by parallel.tp={p.tp}")
    check(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
          f"model.hidden_size={m.hidden_size} is not divisible by "
          f"model.num_attention_heads={m.num_attention_heads}")
    check(m.ffn_hidden_size % p.tp == 0, "parallel.tp",
          f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    check(m.num_layers % p.pp == 0, "parallel.pp",
          f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    check(not (p.sequence_parallel and p.tp == 1), "parallel.sequence_parallel",
          "parallel.sequence_parallel needs parallel.tp > 1")
    check(not (p.sequence_parallel and r.data.seq_length % p.tp), "data.seq_length",
          f"data.seq_length={r.data.seq_length} must be divisible by parallel.tp={p.tp} "
          "with sequence parallelism")
    check(r.data.seq_length <= m.max_position_embeddings, "data.seq_length",
          f"data.seq_length={r.data.seq_length} exceeds "
          f"model.max_position_embeddings={m.max_position_embeddings}")
    check(t.global_batch_size % (t.micro_batch_size * p.dp) == 0, "train.global_batch_size",
          f"train.global_batch_size={t.global_batch_size} is not divisible by "
          f"train.micro_batch_size * parallel.dp = {t.micro_batch_size * p.dp}")
    check(t.min_lr <= t.lr, "train.min_lr", f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}")
    decay = t.decay_steps or t.steps
    check(t.warmup_steps < decay, "train.warmup_steps",
          f"train.warmup_steps={t.warmup_steps} must be less than the decay length {decay} "
          "(train.decay_steps, or train.steps when unset)")
    split = [float(x) for x in r.data.split.replace("/", ",").split(",") if x.strip()]
    check(len(split) == 3 and all(x >= 0 for x in split) and split[0] > 0, "data.split",
          f"data.split={r.data.split!r} must be three non-negative weights 'train,valid,test' "
          "with train > 0")
    check(not (r.data.eval_every and len(split) == 3 and split[1] == 0), "data.eval_every",
          f"data.eval_every={r.data.eval_every} needs a validation part in data.split "
          f"(got {r.data.split!r}); set data.eval_every=0 or e.g. data.split=98,2,0")
    check(t.new_tokens_from is not None or not any(s.startswith("new_") for s in t.trainable),
          "train.trainable", f"train.trainable={t.trainable} trains new token rows but "
          "train.new_tokens_from is not set (the first added id; 'hcx import --tokenizer' "
          "writes it into the recipe stub)")
    check(t.trainable == ["all"] or p.pp == 1, "train.trainable",
          f"train.trainable={t.trainable} needs parallel.pp=1 (a pipeline stage with nothing "
          "to train has no optimizer); use tensor and data parallelism")
    names = [s.name for s in r.data.sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, "data.sources", f"duplicate source names: {dup}")
    errors += cluster_option_errors(r)
    return errors


def cluster_option_errors(r: Recipe) -> list[tuple[str, str]]:
    """Rules of the cluster options (overlap, recomputation, FP8, context parallelism)
    that the recipe alone decides; what the machine must have is checked when the engine
    is built (:func:`hcx.engine.model.check_machine`)."""
    m, p, t = r.model, r.parallel, r.train
    errors: list[tuple[str, str]] = []

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            errors.append((key, msg))

    check(not (p.overlap_param_gather and not p.distributed_optimizer),
          "parallel.overlap_param_gather",
          "parallel.overlap_param_gather needs parallel.distributed_optimizer=true (it "
          "all-gathers the optimizer's parameter shards)")
    check(not (p.overlap_param_gather and not p.overlap_grad_reduce),
          "parallel.overlap_param_gather",
          "parallel.overlap_param_gather needs parallel.overlap_grad_reduce=true (megatron "
          "overlaps the gather only together with the reduction)")
    layers = m.num_layers // p.pp if m.num_layers % p.pp == 0 else m.num_layers
    if t.recompute != "full":
        for key in ("recompute_method", "recompute_num_layers"):
            check(getattr(t, key) is None, f"train.{key}",
                  f"train.{key} applies to full recomputation only; set train.recompute=full "
                  f"or remove it (train.recompute={t.recompute})")
    else:
        check(t.recompute_num_layers is None or t.recompute_num_layers <= layers,
              "train.recompute_num_layers",
              f"train.recompute_num_layers={t.recompute_num_layers} exceeds the "
              f"{layers} layers of a pipeline stage (model.num_layers / parallel.pp)")
    if p.cp > 1:
        check(r.data.seq_length % (2 * p.cp) == 0, "data.seq_length",
              f"data.seq_length={r.data.seq_length} must be divisible by 2 x parallel.cp = "
              f"{2 * p.cp} (each context-parallel rank takes two chunks, one early and one "
              "late, to balance causal attention)")
        sp = p.tp if p.sequence_parallel else 1
        check(not (sp > 1 and r.data.seq_length % (2 * p.cp * sp)), "data.seq_length",
              f"data.seq_length={r.data.seq_length} must be divisible by 2 x parallel.cp x "
              f"parallel.tp = {2 * p.cp * sp} with sequence parallelism")
        check(m.transformer_impl != "local", "parallel.cp",
              f"parallel.cp={p.cp} needs Transformer Engine's attention "
              "(model.transformer_impl auto or transformer_engine, not local)")
    if t.fp8 is not None:
        check(t.precision != "fp32", "train.fp8",
              "train.fp8 runs the matmuls in FP8 inside bf16 training: set train.precision "
              "to bf16 or auto (not fp32)")
        check(m.transformer_impl != "local", "train.fp8",
              "train.fp8 needs Transformer Engine's layers (model.transformer_impl auto or "
              "transformer_engine, not local)")
        check(m.hidden_size % 16 == 0 and m.ffn_hidden_size % (16 * p.tp) == 0,
              "train.fp8", f"train.fp8 needs model.hidden_size ({m.hidden_size}) and "
              f"model.ffn_hidden_size / parallel.tp ({m.ffn_hidden_size} / {p.tp}) divisible "
              "by 16 (FP8 GEMM shapes)")
    return errors


# --- loading ----------------------------------------------------------------------


def _line_map(node: yaml.Node, path: str, prefix: str = "", out: dict | None = None) -> dict:
    """dotted key -> 'file:line' for every key in a YAML mapping."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for knode, vnode in node.value:
            key = f"{prefix}{knode.value}"
            out[key] = f"{path}:{knode.start_mark.line + 1}"
            _line_map(vnode, path, key + ".", out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix[:-1]}.{i}" if prefix else str(i)
            out[key] = f"{path}:{item.start_mark.line + 1}"
            _line_map(item, path, key + ".", out)
    return out


def _read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return data, _line_map(node, str(path)) if node is not None else {}


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --- input paths -------------------------------------------------------------------
# Recipe keys that name inputs which must exist (files, folders, checkpoints, dataset
# prefixes); ``*`` stands for a list index. Their relative values are made absolute when
# the recipe is loaded (hcx.paths.resolve_input; docs/recipes.md, "Paths"). Outputs
# (output_dir, checkpoint.dir, data.cache_dir, data.prepare.output_dir) stay as written:
# relative to the current directory, where the user chooses to put runs.
RECIPE_INPUTS = ("data.tokenizer.path", "data.sources.*.path", "data.sources.*.prefix",
                 "data.prepare.decontaminate.eval_dir", "checkpoint.init_from",
                 "align.reference", "align.fdpg.scorer", "align.online.reward",
                 "align.online.judge_prompts", "align.self_judge.judge",
                 "align.self_judge.judge_prompts")
REWARD_MODEL_SCORER = "reward-model:"  # align.fdpg.scorer's checkpoint form
JUDGE_REWARD = "judge:"  # align.online.reward's judge form


def _resolve_inputs(node: Any, key: str, recipe_dir: Path | None,
                    inputs: tuple[str, ...]) -> Any:
    """``node`` (the value at dotted ``key``) with every input path under it resolved
    from ``recipe_dir`` (None: the command line)."""
    from hcx.paths import resolve_input

    if isinstance(node, dict):
        return {k: _resolve_inputs(v, f"{key}.{k}" if key else str(k), recipe_dir, inputs)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_inputs(v, f"{key}.*", recipe_dir, inputs) for v in node]
    if not isinstance(node, str) or key not in inputs:
        return node
    if key == "align.self_judge.judge":
        # 'self', 'reward' and http(s) endpoints name no input; a checkpoint does
        if node in ("self", "reward") or node.startswith(("http://", "https://")):
            return node
        return resolve_input(node, recipe_dir)
    if key in ("align.fdpg.scorer", "align.online.reward"):
        # 'reward-model:PATH' and 'judge:PATH' name inputs; 'module:function', 'math',
        # 'code', 'judge:self' and 'judge:http(s)://...' do not.
        for prefix in (REWARD_MODEL_SCORER, JUDGE_REWARD):
            if node.startswith(prefix):
                rest = node[len(prefix):]
                if prefix == JUDGE_REWARD and (rest == "self" or not rest):
                    return node
                return prefix + resolve_input(rest, recipe_dir)
        return node
    return resolve_input(node, recipe_dir)


def find_base(base: str, file: Path, shipped: tuple[Path, ...]) -> Path:
    """Where ``base: NAME`` in ``file`` points: a path from the file's folder (or an
    absolute one), else a file of that name (``.yaml`` optional) in the ``shipped``
    folders, so a user's file anywhere can extend the shipped ones by name."""
    path = Path(base) if Path(base).is_absolute() else file.parent / base
    if path.is_file() or Path(base).is_absolute():
        return path
    for folder in shipped:
        for name in (base, f"{base}.yaml"):
            if (folder / name).is_file():
                return folder / name
    return path


def _load_chain(path: Path, seen: tuple[Path, ...] = (), inputs: tuple[str, ...] = (),
                shipped: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    path = path.resolve() if path.is_absolute() else path
    key = path.resolve()
    if key in seen:
        chain = " -> ".join(str(p) for p in (*seen, key))
        raise RecipeError(f"{path}: 'base:' inheritance cycle: {chain}")
    data, lines = _read_yaml(path)
    base = data.pop("base", None)
    if inputs:  # each file's relative paths from its own folder, before merging
        data = _resolve_inputs(data, "", path.parent, inputs)
    if base is None:
        return data, lines
    if not isinstance(base, str):
        raise RecipeError(f"{lines.get('base', path)}: 'base' must be a path string")
    base_data, base_lines = _load_chain(find_base(base, path, shipped), (*seen, key), inputs,
                                        shipped)
    return _deep_merge(base_data, data), {**base_lines, **lines}


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    cur: Any = data
    for i, part in enumerate(parts):
        if isinstance(cur, list) and not (part.isdigit() and int(part) < len(cur)):
            raise RecipeError(f"override {text!r}: '{'.'.join(parts[:i])}' has {len(cur)} items, "
                              f"so '{part}' is not a valid index (0-{len(cur) - 1})")
        if i == len(parts) - 1:
            break
        if isinstance(cur, list):
            cur = cur[int(part)]
            continue
        if not isinstance(cur, dict):
            raise RecipeError(f"override {text!r}: '{'.'.join(parts[:i])}' is not a section")
        cur = cur.setdefault(part, {})
    last = parts[-1]
    if isinstance(cur, list) and last.isdigit() and int(last) < len(cur):
        cur[int(last)] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise RecipeError(f"override {text!r}: '{'.'.join(parts[:-1])}' is not a section")


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (for 'did you mean' suggestions)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cands = [ann, *args]
        cur = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}))


def origin_of(key: str, origins: dict[str, str], default: str) -> str:
    parts = key.split(".")
    while parts:
        k = ".".join(parts)
        if k in origins:
            return origins[k]
        parts.pop()
    return default


def load_config(path: str | Path, model: type[M], overrides: list[str] | tuple[str, ...] = (),
                what: str = "recipe", inputs: tuple[str, ...] | None = None,
                bases: tuple[Path, ...] = ()) -> tuple[M, dict[str, str]]:
    """Load a YAML file (with ``base:`` chains and ``KEY=VALUE`` overrides) into a pydantic
    model. Errors name ``file:line`` of the key at fault. Returns the model and the origin
    (``file:line`` or override) of every key, for later checks to cite. Raises RecipeError.

    ``inputs``: dotted keys (``*`` = any list index) whose relative paths are made
    absolute, from the folder of the file that sets them or, for overrides, from the
    current directory (:func:`hcx.paths.resolve_input`); default: :data:`RECIPE_INPUTS`
    for recipes, none otherwise. ``bases``: folders where ``base: NAME`` is looked up when
    it is not a file beside the one that names it (:func:`find_base`)."""
    path = Path(path)
    if inputs is None:
        inputs = RECIPE_INPUTS if model is Recipe else ()
    data, origins = _load_chain(path, inputs=inputs, shipped=tuple(bases))
    for text in overrides:
        parts, value = parse_override(text)
        if inputs:
            value = _resolve_inputs(value, ".".join("*" if p.isdigit() else p for p in parts),
                                    None, inputs)
        _apply_override(data, parts, value, text)
        origins[".".join(parts)] = f"override {text!r}"
        for i in range(1, len(parts)):  # parents created by the override point at it too
            origins.setdefault(".".join(parts[:i]), f"override {text!r}")
    return validate_config(data, model, origins, str(path), what), origins


def validate_config(data: dict, model: type[M], origins: dict[str, str], default: str,
                    what: str = "recipe") -> M:
    """Validate a mapping into a pydantic model; each error names the origin of its key
    (``origins``: dotted key -> where it was set; ``default`` for keys not listed)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"])
            key = ".".join(str(p) for p in loc) or "<root>"
            where = origin_of(key, origins, default)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                known = _known_keys(model, loc)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                msg = f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                msg += f"; valid keys here: {', '.join(known)}"
            elif err["type"] == "missing":
                msg = f"missing required key '{key}'"
            else:
                got = err.get("input")
                msg = f"{key}: {msg} (got {got!r})" if not isinstance(got, dict) else f"{key}: {msg}"
            lines.append(f"{where}: {msg}")
        raise RecipeError(f"invalid {what}:\n  " + "\n  ".join(lines)) from None


def refuse(recipe: Recipe, problems: list[tuple[str, str]]) -> None:
    """Raise one RecipeError listing every ``(key, message)`` problem, each at the
    ``file:line`` that set its key."""
    if problems:
        lines = [f"{recipe.where(key)}: {key}: {msg}" for key, msg in problems]
        raise RecipeError("impossible recipe:\n  " + "\n  ".join(lines))


def _with_origins(recipe: Recipe, origins: dict[str, str], default: str) -> Recipe:
    recipe._origins, recipe._source = dict(origins), default
    return recipe


def validate_recipe(data: dict, origins: dict[str, str], default: str) -> Recipe:
    """A recipe built in code (``hcx import`` writes one), checked exactly as
    :func:`load_recipe` checks files, errors naming ``origins`` (e.g. a command-line flag)."""
    recipe = _with_origins(validate_config(data, Recipe, origins, default), origins, default)
    refuse(recipe, layout_errors(recipe))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge, override and validate a training recipe. Raises RecipeError. A path
    that does not exist may name a shipped recipe (``tiny.yaml``, ``recipes/tiny.yaml``:
    :func:`hcx.resources.recipe_path`)."""
    from hcx.resources import recipe_path, recipes_dir

    path = recipe_path(path)
    recipe, origins = load_config(path, Recipe, overrides, bases=(recipes_dir(),))
    recipe = _with_origins(recipe, origins, str(path))
    refuse(recipe, layout_errors(recipe))
    return recipe
