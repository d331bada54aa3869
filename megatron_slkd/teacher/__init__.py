"""Teacher back ends and the cache-building runner."""

from megatron_slkd.teacher.build import BuildConfig, build_cache, plan_shards
from megatron_slkd.teacher.hf import HFTeacher, TeacherError, smollm2_gguf
from megatron_slkd.teacher.windows import Window, document_windows

__all__ = [
    "BuildConfig",
    "build_cache",
    "plan_shards",
    "HFTeacher",
    "TeacherError",
    "smollm2_gguf",
    "Window",
    "document_windows",
]
