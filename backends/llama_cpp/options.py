"""The options of the three llama.cpp modes: what all take, then each mode's own, with the server flags a scenario
may add to each server (an allowlist: where a server listens and which model it serves are the harness's)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.llama_cpp.gguf import GGUF_TYPES
from backends.openai_backend import OpenAIClientOptions
from harness.core.processes import check_server_args

# llama_cpp.server's flags (its Settings' fields) a scenario may add, in full (check_server_args). Left out: where it
# listens (host, port, ssl_keyfile, ssl_certfile, and config_file, which can set them) and what the harness sets
# from the scenario (model, model_alias).
SERVER_FLAGS = tuple(f"--{name}" for name in (
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap", "use_mlock", "kv_overrides",
    "rpc_servers", "seed", "n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "rope_scaling_type",
    "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_orig_ctx", "mul_mat_q", "logits_all", "embedding", "offload_kqv", "flash_attn", "last_n_tokens_size",
    "lora_base", "lora_path", "numa", "chat_format", "chat_template_kwargs", "clip_model_path", "cache",
    "cache_type", "cache_size", "hf_tokenizer_config_path", "hf_pretrained_model_name_or_path", "hf_model_repo_id",
    "draft_model", "draft_model_num_pred_tokens", "type_k", "type_v", "verbose", "api_key", "interrupt_requests",
    "disable_ping_events", "root_path"))
# Secret flags go to the server as the variables its settings (pydantic-settings) also read, never on its argv.
SERVER_SECRETS = {"--api_key": "API_KEY"}

# llama-server's flags a scenario may add, with their short forms: threads and their placement, KV cache type and
# layout, memory and GPU placement, the prompt cache and slot handling. Not: --host, --port, the model, anything
# naming a file or a URL (a config, an API key, logs, slot saves, downloads), nor what the harness sets from options
# (context, batch, slots, threads, GPU layers, flash attention).
SERVER_ARGS = (
    "-C", "--cpu-mask", "-Cr", "--cpu-range", "--cpu-strict", "--prio",
    "--poll", "-Cb", "--cpu-mask-batch", "-Crb", "--cpu-range-batch", "--cpu-strict-batch", "--prio-batch",
    "--poll-batch", "--numa", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-dt", "--defrag-thold", "-kvu",
    "--kv-unified", "-no-kvu", "--no-kv-unified", "--swa-full", "-cram", "--cache-ram", "--cache-reuse",
    "--context-shift", "--no-context-shift", "-lm", "--load-mode", "--repack", "-nr", "--no-repack", "-sm",
    "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev", "--device", "-ot", "--override-tensor",
    "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe", "--op-offload", "--no-op-offload", "-fit", "--fit", "-to",
    "--timeout", "--threads-http", "-sps", "--slot-prompt-similarity", "--cache-prompt", "--no-cache-prompt",
    "-nocb", "--no-cont-batching", "--no-warmup", "--cache-idle-slots", "--no-cache-idle-slots",
)
OPEN_LOOP_SLOTS = 4  # llama-server's own default (--parallel auto), for loads with no fixed concurrency


class LlamaCppOptions(BaseModel):
    """What every mode takes."""
    model_config = ConfigDict(extra="forbid")
    exact_length: bool = Field(True, description="outputs of exactly max_tokens: decoding goes on past EOS in "
                                                 "process; the server gets EOS biased away")
    gguf_type: Literal[GGUF_TYPES] = Field("f32", description="f32/f16/bf16/q8_0 written by the converter; k-quants "
                                                             "and others by llama.cpp's quantizer")
    gguf: Path | None = Field(None, description="use this GGUF file instead of converting the model folder")
    n_ctx: int = Field(4096, gt=0, description="context size: must hold prompt + output tokens")
    n_batch: int = Field(512, gt=0, description="prompt tokens per llama_decode call")
    n_threads: int | None = Field(None, gt=0, description="decode and batch threads; default: physical cores")
    flash_attn: bool = False
    n_gpu_layers: int | None = Field(None, ge=-1, description="override; default: from the VRAM budget, else all (-1)")
    offload_kqv: bool | None = Field(None, description="override; default: from the VRAM budget, else true")


class LlamaCppInProcessOptions(LlamaCppOptions):
    mode: Literal["in_process"] = "in_process"
    prefix_reuse: bool = Field(False, description="keep the KV cache between requests: llama.cpp then reuses the "
                                                  "longest prefix a prompt shares with the previous request (its "
                                                  "prompt and output); false: each request starts from an empty "
                                                  "KV cache")


class LlamaCppServedOptions(LlamaCppOptions, OpenAIClientOptions):
    """What both server modes take: the OpenAI client's options and the launched server's start-up time."""
    startup_timeout_s: float = Field(120, gt=0)


class LlamaCppServerOptions(LlamaCppServedOptions):
    mode: Literal["server"] = "server"
    server_args: list[str] = Field(default_factory=list, description="extra llama_cpp.server flags, spelled in full "
                                                                    "(not --host, --port, --ssl_*, --config_file: "
                                                                    "the harness serves on 127.0.0.1 at a port it "
                                                                    "picks); --api_key reaches the server through its "
                                                                    "environment, not its command line")

    _allowed = field_validator("server_args")(lambda v: check_server_args(v, SERVER_FLAGS, "llama_cpp.server"))


class LlamaServerOptions(LlamaCppServedOptions):
    mode: Literal["llama_server"] = "llama_server"
    binary: Path | None = Field(None, description="the llama-server executable; default: the one "
                                                  "scripts/install-llama-server.sh built, else llama-server on PATH")
    parallel: int | None = Field(None, gt=0, description="server slots (--parallel), decoded together by continuous "
                                                         "batching; default: the load's concurrency (sequential: 1; "
                                                         f"open loops and capacity searches: {OPEN_LOOP_SLOTS})")
    server_args: list[str] = Field(default_factory=list, description="extra llama-server flags, from an allowlist of "
                                                                    "speed settings (docs/engines.md)")

    @field_validator("server_args")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        return check_server_args(v, SERVER_ARGS, "llama-server", equals=False)  # llama.cpp never reads --flag=value
