"""Every option of the engine, its type, its default and its meaning, in one place.

`Engine` takes an EngineConfig (or the same names as keywords), `make_plan` reads one, and the `own` backend's
options and `bench engine plan` are built from its fields. A caller that wants another default for an option
redeclares that field with the same annotated type (the `own` backend plans for 8 sequences of 8,192 tokens).
"""
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EngineError

DType = Literal["float32", "float16", "bfloat16"]
Tier = Literal["auto", "gpu", "cpu", "disk"]

MaxContext = Annotated[int | None, Field(gt=0, description="the longest prompt + output a sequence may reach "
                                                           "(none: the model's max_position_embeddings, at most 4096)")]
MaxBatch = Annotated[int, Field(gt=0, description="sequences the scheduler runs together (KV is planned for them)")]
Budget = Annotated[str | int | None, Field(description="device memory the plan may use, e.g. 8GiB (on the CPU "
                                                       "device: the RAM for resident weights, KV and buffers); "
                                                       "none: unlimited")]
OffloadDir = Annotated[Path | None, Field(description="where disk-tier files are written (none: a new temporary "
                                                      "folder); a folder holding files of yours is worked in beside "
                                                      "them (its own_engine/ subfolder), never emptied")]

DEFAULT_MAX_CONTEXT = 4096  # max_context none: the model's max_position_embeddings, at most this


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    dtype: DType | None = Field(None, description="weights as stored and streamed; none: the checkpoint's")
    compute_dtype: DType | None = Field(None, description="the dtype compute runs in; none: the compute policy's "
                                                          "choice for this device (the plan says which and why)")
    kv_dtype: DType | None = Field(None, description="the KV cache's dtype; none: the compute dtype (read in place)")
    vram_budget: Budget = None
    weights: Tier = Field("auto", description="where layer weights live: gpu (resident), cpu (pinned host), disk")
    kv: Tier = Field("auto", description="where KV blocks live")
    offload_dir: OffloadDir = None
    keep_offload: bool = Field(False, description="leave the offload files in place after the engine closes")
    max_context: MaxContext = None
    max_batch: MaxBatch = 1
    # The prefix cache reuses whole blocks: a question after a document recomputes the document's last partial block.
    # 201M bf16 model, 2,048-token document + 32-token question, Intel Xeon (AMX) 2 threads: second TTFT 0.18x the
    # first with 256-token blocks, 0.08x with 64, 0.06x with 32; first TTFT and decode unchanged (also at 8,192).
    block_size: int = Field(32, gt=0, description="tokens per KV block (the prefix cache's unit of reuse)")
    prefill_chunk: int | None = Field(None, gt=0, description="rows per chunk of a pass over the weights, and of a "
                                                              "pass decodes wait behind (none: 2048 on a CPU, where "
                                                              "a pass with a decode takes at most 512 unless "
                                                              "max_batch is 1; 512 on CUDA; halved until the budget "
                                                              "fits)")
    pack_weights: bool | None = Field(None, description="write disk-tier layers into per-layer files under "
                                                        "offload_dir, aligned and in the engine dtype (none: on the "
                                                        "CPU, and wherever the dtype is converted; false: read the "
                                                        "safetensors in place where the dtype matches)")
    prefix_cache: bool = Field(True, description="reuse the KV of full blocks a prompt shares with earlier ones")
    prefix_cache_dir: Path | None = Field(None, description="also keep those blocks on disk, for later runs (a "
                                                            "folder holding files of yours: in its own_engine/ "
                                                            "subfolder)")

    @classmethod
    def of(cls, config: "EngineConfig | None" = None, **options: object) -> "EngineConfig":
        """config's engine options (a subclass's too, its other fields left out) with `options` replacing them; a
        bad value is an EngineError naming the option."""
        try:
            return cls.model_validate({**(config.model_dump(include=set(cls.model_fields)) if config else {}),
                                       **options})
        except ValidationError as e:
            raise EngineError("; ".join(f"{'.'.join(map(str, err['loc']))}={err.get('input')!r}: "
                                        f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())) from None

    def context_for(self, max_position_embeddings: int) -> int:
        """Tokens per sequence the plan makes room for."""
        return self.max_context or min(max_position_embeddings, DEFAULT_MAX_CONTEXT)
