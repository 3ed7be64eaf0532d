"""The saved-model format, in one room: what slimlm writes for a model, how it is read back, and its bytes.

A saved model is a directory that transformers (+ compressed-tensors) and vLLM load as it is:

    model.safetensors        every tensor; quantized linears in compressed-tensors' layouts, tied copies once
    config.json              the model's config, its `quantization_config` (one group per grid), a pruned model's
                             `sparsity_config`, a kv-cache setting as `slimlm_kv_cache`
    generation_config.json   and the tokenizer's files
    slimlm.json              the manifest: base model, recipe, what each stage did, metrics, and what the writer
                             adds (storage bytes, quantized linears, library versions)

    atomic.py    written into a hidden sibling directory and renamed into place at the end; disk errors in one line
    layout.py    quantized linears <-> their tensors (pack-quantized, int-quantized) and `quantization_config`
    sparsity.py  the `sparsity_config` a pruned model's weights show
    sizes.py     bytes: of a safetensors file from its entries (exact, before it is written), per module from headers
    manifest.py  slimlm.json: what the writer adds to it, and reading it back
    save.py      `save_model`: all of the above, atomically; returns what it wrote
    load.py      `load_slimlm_dir`: the directory back into a model, quantized linears rebuilt from their codes

The room sits above the quantizers (it packs their modules; nothing in quantize/, prune/, distill/ imports it) and
below the loader, export, search and the API, which call in here.
"""
