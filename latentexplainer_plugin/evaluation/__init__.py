"""Evaluation of latent explanations: which factor a latent captures, disentanglement metrics
(MIG, DCI, SAP) and reference metrics of explanation text (BLEU, ROUGE-L, CIDEr-D, METEOR, SPICE,
BERTScore).

The submodules are imported lazily by their users (``from latentexplainer_plugin.evaluation import
text_metrics``) so that importing the package stays cheap.
"""
