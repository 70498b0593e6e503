"""How a stored model runs: backends and their layouts, fusion, and the decode loop.

    backends/   one file per backend (what it supports, its layout, its forward), and choosing one
    linear.py   the stored layers made to run on a backend
    fusion.py   modules swapped in at load: epilogues inside the GEMVs, the split-cache decode attention
    load.py     prepare_for_inference: backends, fusion, freed codes, the activation dtype, once
    generate.py the KV cache, sampling, CUDA graphs, compilation, generate / generate_stream
"""
