"""The argument parser of every command (no torch import: ``--help`` answers at once)."""

from __future__ import annotations

import argparse

DEFAULT_TRAIN_STEPS = 6000  # = models.training.DEFAULT_STEPS (kept here so the parser needs no torch import)

TRAIN_VAE_EPILOG = """\
defaults (why each; docs/training.md has the measurements):
  objective   beta-TCVAE (Chen et al. 2018): closed-form KL per latent + (beta-1) * total correlation
  warm-up     KL/TC weight 0 -> 1 over the first quarter of the steps (Bowman et al. 2016; Sønderby
              et al. 2016): latents get used before the KL cost can switch them off (posterior collapse)
  beta        normalised (Higgins et al. 2017): beta_norm * H*W*C / latents, so the balance against the
              summed reconstruction term does not depend on the image size
  free bits   1 nat per latent is free (Kingma et al. 2016) for the first 40 % of the steps, fading to 0
              at 80 %: latents stay alive until the decoder uses them (warm-up alone lost the objects
              of shapes2), and unused ones still collapse by the end, so the activity report is honest
  capacity    annealing (Burgess et al. 2018) is off; --capacity 25 forces information through
  threads     the free cores: 2 on an idle 2-core machine, 1 when another process keeps a core busy
              (measured on 2 shared cores: 1 thread 0.55 steps/s, 2 threads 0.28 steps/s)

time: the defaults (6000 steps x 64 images of 64x64 = 384k images) take about 9 minutes on one idle
core (730 images/s), less with 2 idle threads, proportionally longer when other processes share the
cores (19 minutes with 2 threads beside the test suite, 61 minutes with 1 thread beside 3-7 other
CPU-bound jobs; docs/training.md). --steps 2000 takes a third of that and captures one factor less.
Measured: on held-out shapes2 and shapes3 images these defaults capture 4 factors (background, x and
y position, scale; 2000 steps: 3); hue is still missed.

At the end it prints the KL of every latent, the active ones (KL > 0.05 nats) and, when the data has
factors, the factor each captures; all of it goes into config.json under "training". It warns loudly
when most latents collapsed.
"""


def _add_explain_options(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--out", default=default_out, required=default_out is None, help="run directory to write")
    p.add_argument("--backend", default="offline", help="offline | openai:MODEL | hf:PATH_OR_ID | a plugin's backend")
    p.add_argument("--samples", type=int, default=5, help="answers per latent (n); default 5")
    p.add_argument("--bias", default=None, help="inductive bias: disentanglement | combination | conditional | a plugin's (default: the adapter's; vae: disentanglement, ddpm: combination)")
    p.add_argument("--similarity", default="agree", help="certainty measure: agree (same attribute and direction; default) | embed (sentence embeddings) | bow (the paper's bag of words, exactly) | bow-refined (docs/concepts.md)")
    p.add_argument("--threshold", type=float, default=None, help="certainty threshold in [0,1] (default: per similarity)")
    p.add_argument("--strengths", default=None, help="comma-separated traversal values (default -3,-1.5,0,1.5,3)")
    p.add_argument("--latents", default=None, help="comma-separated latent indices to explain (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base latents")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run with other settings in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("rank, then explain (captum); see docs/captum.md")
    r.add_argument("--rank-by", default=None, metavar="METHOD", help="captum.attr method that ranks the latents by a score: IntegratedGradients, Saliency, FeatureAblation, 'NoiseTunnel(IntegratedGradients)', ...; "
                        "for SAE features also frequency (how often each fires)")
    r.add_argument("--score", default=None, help="score of the generated image to attribute: mean | red | green | blue | contrast | MODULE:FUNC (images (B,C,H,W) -> (B,)); default mean")
    r.add_argument("--top-k", type=int, default=None, metavar="K", help="explain only the K latents the score depends on most (needs --rank-by)")
    p.add_argument("-o", "--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the selected adapter, backend or direction finder (repeatable; ADAPTER.KEY=VALUE when several take KEY); latentexplainer plugins --options NAME lists them")
    p.add_argument("--property", default=None, metavar="TEXT", help="the labelled property a conditional direction is tied to (conditional bias), e.g. smiling")
    p.add_argument("--prompt-from-llm", action="store_true", help="let the selected language-model backend write the prompt from the bias formula")
    g = p.add_argument_group("language-model backends (openai:MODEL, hf:PATH_OR_ID); see docs/backends.md")
    g.add_argument("--base-url", default=None, metavar="URL", help="OpenAI-compatible API root (default https://api.openai.com/v1; Ollama: http://localhost:11434/v1)")
    g.add_argument("--api-key-env", default=None, metavar="NAME", help="environment variable that holds the API key (default OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=None, metavar="N", help="most requests in flight at once (openai; default 8)")
    g.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline in seconds of one whole HTTP request, body included (openai; default 60)")
    g.add_argument("--max-retries", type=int, default=None, metavar="N", help="retries after 429/5xx/timeouts/dropped connections (openai; default 4)")
    g.add_argument("--dtype", default=None, help="hf model dtype: float32 | float16 | bfloat16 (default float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="most tokens per answer (openai: max_tokens, default 200; hf: default 120)")
    g.add_argument("--cache-dir", default=None, metavar="DIR", help="response cache directory (default ~/.cache/latentexplainer/responses, or under $XDG_CACHE_HOME)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the response cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentexplainer", description="Explain what the latents of a generative model mean.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="explain every latent of the shipped demo VAE (offline)")
    _add_explain_options(p, "latentexplainer-demo")
    p.add_argument("--sae", nargs="?", const=True, default=None, metavar="PATH",
                   help="explain the features of a sparse autoencoder on the demo decoder instead of its latents; "
                        "without PATH: train one on the demo data first and judge its features against the factors "
                        "(about 5 minutes; docs/sae.md)")

    p = sub.add_parser("explain", help="explain the latents of a model")
    p.add_argument("--model", required=True,
                   help="model directory (train-vae output), hub id, or a generator in code: path/to/file.py:factory "
                        "or package.module:factory (a function returning an nn.Module whose forward(z) gives images)")
    p.add_argument("--adapter", default=None,
                   help="vae (default for directories) | generator (default for file.py:factory) | ddpm | sd | a plugin's adapter")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="latent size of a generator that does not tell (no latent_dim/z_dim/nz attribute)")
    p.add_argument("--site", default=None, help="latent site, e.g. decoder.input or mid_block.output (default: per architecture)")
    p.add_argument("--data", default=None, help="npz with images (and factors) to measure KL and captured factors")
    s = p.add_argument_group("sparse autoencoder features (--sae); see docs/sae.md")
    s.add_argument("--sae", default=None, metavar="PATH",
                   help="explain the features of this SAE (SAELens, sparsify or dictionary_learning layout) instead of the "
                        "model's latents; --site is where the SAE reads (default: the SAE file's hook, else the model's site)")
    s.add_argument("--features", default=None, metavar="LIST", help="comma-separated SAE features to explain (default: all)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint (.pt/.bin) when the model has no safetensors; read with torch.load(weights_only=True)")
    d = p.add_argument_group("diffusion models (--adapter ddpm | sd); see docs/diffusion.md")
    d.add_argument("--direction", default=None, help="direction finder: ddpm/sd h-space: pca (default) | pullback | conditional (needs --data); "
                   "generator latent space: sefa | ganspace (default: the latent axes); a plugin's; a directions .safetensors file")
    d.add_argument("--n-directions", type=int, default=None, metavar="K", help="directions to find (default 8; conditional: one per binary factor)")
    d.add_argument("--steps", type=int, default=None, help="denoising steps per image (default 50)")
    d.add_argument("--t-edit", type=int, default=None, help="edit h on every step with timestep t >= T (default: half the training timesteps)")
    d.add_argument("--edit-scale", default=None, help="h <- h + strength * scale * v; auto: scale = std of <h, v> over 16 samples (default)")
    d.add_argument("--prompt", default=None, help="sd: the prompt every image is generated from (default 'a photograph')")
    d.add_argument("--guidance-scale", type=float, default=None, help="sd: classifier-free guidance weight (default 7.5; <= 1: none)")
    _add_explain_options(p, None)

    p = sub.add_parser("train-vae", help="train a beta-TCVAE on an npz of images",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_VAE_EPILOG)
    p.add_argument("--data", required=True, help="npz with images (N,H,W,3) uint8, optional factors and factor_names")
    p.add_argument("--out", required=True, help="directory for config.json and model.safetensors")
    p.add_argument("--latents", type=int, default=10, help="latent dimensions (default 10)")
    p.add_argument("--steps", type=int, default=DEFAULT_TRAIN_STEPS, help=f"optimiser steps (default {DEFAULT_TRAIN_STEPS})")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to 5%% (default 1e-3)")
    p.add_argument("--beta", type=float, default=None,
                   help="weight of the total-correlation term (Chen et al. 2018); default: from --beta-norm")
    p.add_argument("--beta-norm", type=float, default=0.005,
                   help="normalised beta (Higgins et al. 2017): beta = max(1, beta_norm * H*W*C / latents); "
                        "default 0.005 (6.1 for 64x64 RGB, 10 latents)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="KL warm-up: the KL/TC weight rises 0 -> 1 over these steps (Bowman et al. 2016, "
                        "Sønderby et al. 2016); default a quarter of --steps; 0: off")
    p.add_argument("--free-bits", type=float, default=1.0,
                   help="nats per latent whose KL is free (Kingma et al. 2016), faded out (see --free-bits-steps); default 1; 0: off")
    p.add_argument("--free-bits-steps", type=int, default=None,
                   help="free bits held for the first half of these steps, then linearly to 0 here; default 0.8 x --steps; 0: never faded")
    p.add_argument("--capacity", type=float, default=0.0,
                   help="capacity annealing C_max in nats (Burgess et al. 2018): the KL is pulled to C(t); default 0 (off)")
    p.add_argument("--capacity-steps", type=int, default=None, help="steps over which C(t) rises to C_max (default: half of --steps)")
    p.add_argument("--capacity-weight", type=float, default=100.0, help="gamma of |KL - C(t)| (default 100)")
    p.add_argument("--recon-scale", type=float, default=1.0,
                   help="multiplies the Bernoulli log-likelihood; > 1 weighs reconstruction more (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; default 0: the cores not already busy (1 or 2 on 2 cores)")
    p.add_argument("--stop-on-collapse", action="store_true", help="stop early when most latents collapsed after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train-demo", help="regenerate the shipped demo weights (seeded, reproducible)")
    p.add_argument("--out", default=None, help="where to write them (default: the package's demo/weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train-demo-vlm", help="rebuild the demo VLM: a tiny LLaVA trained to caption the shapes data (docs/vlm.md)")
    p.add_argument("--out", default=None, help="where to write it (default: the package's vlm/weights)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000: about 6 CPU-minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=500, help="held-out images for caption accuracy (default 500; 0: skip)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("demo-vlm", help="the multimodal demo, offline: caption accuracy and three lenses per layer on the demo VLM (docs/vlm.md)")
    p.add_argument("--out", default="demo-vlm-out", help="output directory for results.json, lenses.png and report.html (default demo-vlm-out)")
    p.add_argument("--model", default=None, help="a demo-VLM directory (default: the shipped weights)")
    p.add_argument("--caption-images", type=int, default=200, help="held-out images captioned (default 200)")
    p.add_argument("--lens-images", type=int, default=100, help="held-out images whose visual tokens the lenses read (default 100)")
    p.add_argument("--bank-captions", type=int, default=1000, help="training captions in the LatentLens bank (default 1000)")
    p.add_argument("--top-k", type=int, default=5, help="neighbours per visual token (default 5)")
    p.add_argument("--sae-features", type=int, default=64, help="features of the SAE trained on image tokens (default 64; 0: skip)")
    p.add_argument("--sae-steps", type=int, default=400, help="SAE training steps (default 400)")
    p.add_argument("--feature-train-images", type=int, default=600, help="images the SAE is trained on (default 600)")
    p.add_argument("--feature-images", type=int, default=200, help="held-out images the features are read on (default 200)")

    p = sub.add_parser("sae-train", help="collect a model's activations at a site and train a TopK sparse autoencoder (docs/sae.md)")
    p.add_argument("--model", required=True, help="model directory, hub id or file.py:factory (as for explain)")
    p.add_argument("--adapter", default=None, help="adapter (default: chosen from the model)")
    p.add_argument("--site", default=None, help="where the activations live, e.g. decoder.fc.1.output (default: the adapter's latent site)")
    p.add_argument("--update", action="store_true", help="train on the block's update (output - input) at --site")
    p.add_argument("--out", required=True, help="directory for the SAE (SAELens layout) and its activations/")
    p.add_argument("--n-features", type=int, default=256, help="SAE features (default 256)")
    p.add_argument("-k", type=int, default=8, help="active features per activation (TopK; default 8)")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps (default 1000)")
    p.add_argument("--samples", type=int, default=4096, help="base latents whose activations are collected (default 4096)")
    p.add_argument("--batch-size", type=int, default=256, help="latents decoded together while collecting (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the adapter (repeatable), e.g. -o steps=20 -o prompt='a cat' for a sampling loop; "
                        "latentexplainer plugins --options NAME lists them")

    p = sub.add_parser("make-data", help="write a procedural shapes dataset as npz")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="shapes", choices=("shapes", "shapes2", "shapes3"),
                   help="shapes: the demo's data; shapes2: other shapes, a tinted gradient background, other ranges; "
                        "shapes3: ellipse/cross/triangle, pastel colours, a cool gradient darker at the top, wider ranges")

    p = sub.add_parser("evaluate", help="explain a VAE, then score the explanations against the data's ground-truth factors")
    p.add_argument("--model", required=True, help="VAE directory (train-vae output)")
    p.add_argument("--data", required=True, help="npz with images, factors (N,K) and factor_names")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle checkpoint when the model has no safetensors")
    p.add_argument("--max-images", type=int, default=5000, help="images used for KL, factors and disentanglement metrics (seeded subsample; default 5000)")
    _add_explain_options(p, None)

    p = sub.add_parser("calibrate", help="learn certainty thresholds from evaluated runs (per backend and similarity)")
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run directories holding evaluation.json")
    p.add_argument("--out", default=None, help="thresholds file (default $XDG_CONFIG_HOME/latentexplainer/thresholds.json)")

    p = sub.add_parser("plugins", help="list registered adapters, backends, biases, direction finders and edit rules")
    p.add_argument("--options", default=None, metavar="NAME", help="show the options and capabilities a component declares")
    return parser
