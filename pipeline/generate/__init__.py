"""What users import at generate time, beside an export: a rotated low-bit KV cache (`kv_cache`) and a
Per-Layer-Embedding row cache (`ple_cache`). Nothing here imports the offline stages' orchestrator."""
