"""Compatibility shims. ``compat.cpu`` runs megatron-core on CPU with gloo; import it
only from tests and CPU runs (``from megatron_slkd.compat import cpu; cpu.enable()``)."""

__all__: list[str] = []
