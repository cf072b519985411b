"""Built-in SAE file formats: SAELens, sparsify (EleutherAI) and dictionary_learning, registered
like a third-party format (``sae/formats.py`` holds the readers and the table of files)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..sae.formats import (LAYOUTS, SAEFormat, has_files, read_dictionary_learning, read_saelens,
                           read_sparsify)

BUILTIN_FORMATS = {
    "saelens": SAEFormat(has_files(*LAYOUTS["saelens"]), read_saelens, LAYOUTS["saelens"],
                         "SAELens (standard, topk, jumprelu)"),
    "sparsify": SAEFormat(has_files(*LAYOUTS["sparsify"]), read_sparsify, LAYOUTS["sparsify"],
                          "EleutherAI sparsify, one folder per hookpoint (topk)"),
    "dictionary_learning": SAEFormat(has_files(*LAYOUTS["dictionary_learning"]), read_dictionary_learning,
                                     LAYOUTS["dictionary_learning"],
                                     "dictionary_learning (ae.pt is a pickle: allow_pickle=True)"),
}


@hookimpl
def latentexplainer_register_sae_formats(register):
    for name, fmt in BUILTIN_FORMATS.items():
        register(name, fmt)
