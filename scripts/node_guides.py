"""The hand-written part of each node's help page (scripts/build_node_docs.py adds the inputs and outputs from the
node's schema): a short summary of what the node is for, and an example of use.  FILES: the models/ folders
(rewards/model_files.py) whose files a node reads."""
from __future__ import annotations

FILES = {"RewardSteerLoadOpenClip": ["open_clip"], "RewardSteerAestheticReward": ["aesthetic", "open_clip"],
         "RewardSteerHPSReward": ["hps"], "RewardSteerPickScoreReward": ["pickscore"],
         "RewardSteerImageReward": ["image_reward"]}

DEMON_EXAMPLE = (
    "Load Checkpoint → MODEL, CLIP, VAE. CLIP Text Encode (positive, negative) → positive / negative. Empty Latent "
    "Image → latent_image. A reward node (e.g. **Colour Reward** toward red, or **HPS v2 / v2.1 Reward**) → "
    "reward; the checkpoint's VAE → vae. Start with K = 8, beta 0.1, steps 20; then VAE Decode → Save Image, and "
    "trace_plot → Preview Image to see the reward per step. With a colour reward set decoder to latent_rgb: nearly "
    "free scoring.")
SMC_EXAMPLE = (
    "Wire it like KSampler, plus a reward and the VAE. Start with particles 4, lambda 10, potential difference, "
    "ess_threshold 0.5. If the trace shows ESS collapsing to 1 at every step, lower lambda or use tempering "
    "exponential; if rewards barely move, raise lambda (its scale is the reward's: HPS scores differ by ~0.01, "
    "PickScore by ~1).")
TREE_EXAMPLE = (
    "Wire it like KSampler, plus a reward and the VAE. dts_star with rollouts 16 searches for the best image within "
    "about 16 plain runs' worth of model calls (less: rollouts share their early steps); set max_calls or "
    "max_seconds to stop on a budget. Switch mode to dts to draw from p·exp(λr) instead.")
SAMPLER_EXAMPLE = (
    "Add SamplerCustomAdvanced (or SamplerCustom) with its usual noise, guider and sigmas (e.g. RandomNoise, "
    "CFGGuider, BasicScheduler), connect this node's SAMPLER output to its sampler input, and a reward and the VAE "
    "to this node.")

GUIDES: dict[str, dict[str, str]] = {
    "RewardSteerReferenceModel": {
        "summary": "A tiny diffusion model whose right answer is known exactly: use it to learn what the steering "
                   "knobs do, and to check a sampler, in seconds on a CPU.",
        "example": "Reference Model → MODEL to a sampler (KSampler, KSampler (Demon), ...), conditioning to both "
                   "positive and negative, VAE to VAE Decode and the sampler's vae. Empty Latent Image 256×256. "
                   "Add **Reference Model Exact Target** with the same reward and latent to see the mean reward "
                   "the steered sampler should reach.",
    },
    "RewardSteerReferenceExactTarget": {
        "summary": "The exact answer for the Reference Model: the law p·exp(λr) a steered sampler targets, so you "
                   "can compare a sampler's mean reward with the truth.",
        "example": "Connect the Reference Model's MODEL, the reward you steer with (a Colour Reward) and the "
                   "latent you sample; set lambda to the SMC sampler's lambda. Its text shows the target's mean "
                   "reward; Score Images on the sampled images shows what the sampler reached.",
    },
    "RewardSteerTinyTestModel": {
        "summary": "For tests: ComfyUI's real SD1.5 UNet at a tiny size with random weights, no files needed.",
        "example": "Use in place of Load Checkpoint: MODEL → a sampler, VAE → VAE Decode, conditioning → positive "
                   "and negative. The images are noise patterns: it checks the wiring, not quality.",
    },
    "RewardSteerTinyFamilyModel": {
        "summary": "For tests: a model family's real ComfyUI network (SD1.5 … Flux, Wan, Qwen-Image) at a tiny size "
                   "with random weights, with a text encoder of the real conditioning shapes.",
        "example": "Pick family flux; MODEL → a sampler, CLIP → CLIP Text Encode, VAE → VAE Decode. Run a steering "
                   "workflow end to end without downloading the real model.",
    },
    "RewardSteerColorReward": {
        "summary": "The simplest reward: the image's mean colour, linearly (no weights file). Good for seeing "
                   "steering work, and exact on the Reference Model.",
        "example": "mode toward colour, red 0.9, green 0.2, blue 0.2 → the sampler's reward: images come out "
                   "redder. Samplers can score it with decoder latent_rgb (nearly free).",
    },
    "RewardSteerImageSimilarityReward": {
        "summary": "Rewards images that look like a reference image (pixel-wise), e.g. to steer toward a "
                   "composition.",
        "example": "Load Image → reference; metric neg_mse → a sampler's reward. Combine it with a prompt reward "
                   "in Combine Rewards to keep the layout while following the prompt.",
    },
    "RewardSteerScoreImages": {
        "summary": "Scores a batch of images with any reward and shows the scores on the node; can keep the best "
                   "(a post-hoc best-of-N).",
        "example": "VAE Decode → images, a reward → reward. Set order best first and keep_top 1 to keep the "
                   "highest-scoring image; its mean output feeds any node that takes a FLOAT.",
    },
    "RewardSteerCombineRewards": {
        "summary": "Weighted sum of up to four rewards, each normalised first so rewards of different scales mix.",
        "example": "HPS v2 / v2.1 Reward → reward_1 (weight 1), LAION Aesthetic Reward → reward_2 (weight 0.5), "
                   "normalisation zscore → a sampler's reward.",
    },
    "RewardSteerDemonSampler": {
        "summary": "Sampling Demons as a SAMPLER: at each steered step it tries K noises, scores where each leads "
                   "with the reward, and steps with their reward-weighted noise. Works with any reward, no "
                   "gradients needed.",
        "example": SAMPLER_EXAMPLE,
    },
    "RewardSteerKSamplerDemon": {
        "summary": "KSampler with Sampling Demons reward steering built in: the easiest way to make images score "
                   "higher on a reward. Costs about K+1 times a plain run when every step is steered.",
        "example": DEMON_EXAMPLE,
    },
    "RewardSteerSMCSampler": {
        "summary": "SMC / Feynman-Kac steering as a SAMPLER: a population of particles per image is reweighted by "
                   "the reward and resampled, targeting p(x)·exp(λ·r(x)).",
        "example": SAMPLER_EXAMPLE,
    },
    "RewardSteerKSamplerSMC": {
        "summary": "KSampler with SMC / FK steering built in: particles per image, reweighted by the reward and "
                   "resampled, so the result is a draw from p(x)·exp(λ·r(x)). Costs about particles times a "
                   "plain run.",
        "example": SMC_EXAMPLE,
    },
    "RewardSteerBestOfN": {
        "summary": "The baseline: sample N seeds per image, score them, keep the best. Any ComfyUI sampler; "
                   "optional early pruning of weak seeds.",
        "example": "Wire it like KSampler, plus a reward and the VAE; n 4. best → VAE Decode; scores_json shows "
                   "every candidate's score. Add prune_at 0.3 and keep_fraction 0.5 to drop the weaker half "
                   "early.",
    },
    "RewardSteerTreeSampler": {
        "summary": "Diffusion Tree Sampling as a SAMPLER: rollouts grow a tree of denoising states, share early "
                   "steps, and pass rewards back up the tree.",
        "example": SAMPLER_EXAMPLE,
    },
    "RewardSteerKSamplerTree": {
        "summary": "KSampler with Diffusion Tree Sampling built in: DTS* searches for the highest-reward image, DTS "
                   "draws from p·exp(λr); both stop on a rollout, model-call or seconds budget.",
        "example": TREE_EXAMPLE,
    },
    "RewardSteerLoadOpenClip": {
        "summary": "Loads an open_clip model from models/open_clip for the CLIP Score and aesthetic rewards.",
        "example": "OpenAI's ViT-L/14 file with architecture ViT-L-14-quickgelu → LAION Aesthetic Reward's clip; "
                   "a LAION ViT-B-32 file with architecture ViT-B-32 → CLIP Score Reward's clip.",
    },
    "RewardSteerAestheticReward": {
        "summary": "The LAION aesthetic predictor (scores ~1..10) as a reward.",
        "example": "Load OpenCLIP (OpenAI ViT-L/14, ViT-L-14-quickgelu) → clip; head "
                   "sac+logos+ava1-l14-linearMSE.pth → a sampler's reward.",
    },
    "RewardSteerClipScoreReward": {
        "summary": "How well each image matches a text, as the cosine of CLIP embeddings.",
        "example": "Load OpenCLIP → clip; leave text empty and type the prompt into the sampler's prompt input, "
                   "or write the text here; negative_text \"blurry\" subtracts that match.",
    },
    "RewardSteerHPSReward": {
        "summary": "Human Preference Score v2 / v2.1: how much people would prefer the image for the prompt.",
        "example": "weights HPS_v2.1_compressed.pt, text empty → KSampler (Demon)'s reward, with the prompt typed "
                   "into the sampler's prompt input.",
    },
    "RewardSteerPickScoreReward": {
        "summary": "PickScore: a CLIP-H model trained on Pick-a-Pic human choices, scoring image against prompt.",
        "example": "weights PickScore_v1/model.safetensors, text empty → KSampler (SMC / FK steering)'s reward, "
                   "with the prompt in the sampler's prompt input.",
    },
    "RewardSteerImageReward": {
        "summary": "ImageReward: a BLIP-based human-preference model scoring image against prompt (~-2..2).",
        "example": "weights ImageReward.pt, text empty → KSampler (Demon)'s reward, with the prompt in the "
                   "sampler's prompt input.",
    },
    "RewardSteerManualPickReward": {
        "summary": "You are the reward: at each steered step the candidates appear as a grid in the page and you "
                   "pick the good ones.",
        "example": "→ KSampler (Demon)'s reward with K 4 and steps 8; queue from the page, then click the "
                   "candidates you like (or keys 1-9, Enter to submit). ask_every 2 asks every other step.",
    },
    "RewardSteerVLMReward": {
        "summary": "A vision-language model behind any OpenAI-compatible API judges the candidates.",
        "example": "base_url https://api.openai.com/v1, model gpt-4o-mini, api_key_env OPENAI_API_KEY (set it in "
                   "ComfyUI's environment), mode pairwise_top_half → KSampler (Demon)'s reward with K 4.",
    },
}
