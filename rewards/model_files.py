"""The files the rewards read from ComfyUI's models/ folders: the exact names, what each file is, its size, where
users usually get it (the public page, by name), the folder it goes in, whether the reward is differentiable and
the weights' licence.  One table for the loaders' missing-file errors, the nodes' help pages and the README.

Sizes are approximate (the published files').  Licences are the weights' own, as their authors publish them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFile:
    name: str       # exact name, relative to the folder
    what: str       # architecture / content
    size: str
    source: str     # where users usually get it: the public page, by name

    def describe(self) -> str:
        return f"{self.name} ({self.what}, {self.size}; from {self.source})"


@dataclass(frozen=True)
class RewardFolder:
    reward: str                     # the reward (node) that reads the folder
    folder: str                     # models/<folder>, registered with folder_paths under this name
    files: tuple[ModelFile, ...]
    layout: str                     # how the files sit in the folder, in a sentence
    differentiable: str
    licence: str

    def describe(self) -> str:
        """What the folder takes, for an error message: every file with what it is, its size and source."""
        return (f"models/{self.folder} takes, for {self.reward}: " + "; ".join(f.describe() for f in self.files)
                + f". {self.layout}")

    def file(self, name: str) -> ModelFile:
        return next(f for f in self.files if f.name == name)


HF = "the Hugging Face page "
OPENAI_VIT_L = ModelFile("open_clip_pytorch_model.bin",
                         "OpenAI CLIP ViT-L/14 in open_clip's format: pick architecture ViT-L-14-quickgelu",
                         "≈1.7 GB", HF + "timm/vit_large_patch14_clip_224.openai")
LAION_VIT_B = ModelFile("open_clip_pytorch_model.bin",
                        "LAION CLIP ViT-B/32 in open_clip's format: pick architecture ViT-B-32",
                        "≈0.6 GB", HF + "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")

REWARD_FOLDERS: dict[str, RewardFolder] = {folder.folder: folder for folder in (
    RewardFolder(
        "CLIP Score and the aesthetic reward's backbone (Load OpenCLIP)", "open_clip", (OPENAI_VIT_L, LAION_VIT_B),
        "Any open_clip checkpoint works (.safetensors / .bin / .pt); both pages name their file "
        "open_clip_pytorch_model.bin, so rename it after the model (e.g. ViT-L-14-openai.bin). A same-named .json "
        "beside a file declares a custom architecture.",
        "yes", "the checkpoint's own (OpenAI CLIP: MIT; LAION's: MIT)"),
    RewardFolder(
        "LAION Aesthetic Reward", "aesthetic",
        (ModelFile("sac+logos+ava1-l14-linearMSE.pth",
                   "the LAION improved aesthetic predictor head: an MLP from CLIP ViT-L/14 image embeddings (768) "
                   "to a 1..10 score", "≈3.7 MB",
                   "the GitHub repository christophschuhmann/improved-aesthetic-predictor"),),
        "It also needs its backbone, OpenAI CLIP ViT-L/14: an open_clip file in models/open_clip (Load OpenCLIP), or "
        "a CLIP vision file in models/clip_vision (core Load CLIP Vision, no gradients).",
        "with the open_clip backbone; not with core CLIP vision", "Apache-2.0 (improved-aesthetic-predictor)"),
    RewardFolder(
        "HPS v2 / v2.1 Reward", "hps",
        (ModelFile("HPS_v2.1_compressed.pt", "HPS v2.1: open_clip ViT-H-14 fine-tuned on human preference choices",
                   "≈2 GB", HF + "xswu/HPSv2"),
         ModelFile("HPS_v2_compressed.pt", "HPS v2: the same architecture, the earlier training", "≈2 GB",
                   HF + "xswu/HPSv2")),
        "Either file alone is enough; the CLIP tokenizer ships inside open_clip.",
        "yes", "Apache-2.0 (HPSv2 repository)"),
    RewardFolder(
        "PickScore Reward", "pickscore",
        (ModelFile("model.safetensors",
                   "PickScore v1: CLIP ViT-H/14 fine-tuned on Pick-a-Pic choices, Hugging Face transformers format "
                   "(pytorch_model.bin works too)", "≈3.9 GB", HF + "yuvalkirstain/PickScore_v1"),
         ModelFile("config.json", "its transformers CLIPConfig", "≈5 kB", HF + "yuvalkirstain/PickScore_v1")),
        "Both in a sub-folder, models/pickscore/PickScore_v1/: copy the PickScore_v1 folder as it is (its "
        "preprocessor_config.json and tokenizer files are used when present, else CLIP's defaults and "
        "ComfyUI's CLIP tokenizer) and pick its weights file.",
        "yes", "none stated on its model page as far as we know: ask its authors"),
    RewardFolder(
        "ImageReward", "image_reward",
        (ModelFile("ImageReward.pt",
                   "ImageReward: BLIP ViT-L image encoder, BERT-base cross-attention text encoder and an MLP head",
                   "≈1.8 GB", HF + "THUDM/ImageReward"),
         ModelFile("med_config.json", "the BERT configuration of its text encoder", "≈1 kB",
                   HF + "THUDM/ImageReward"),
         ModelFile("bert-base-uncased/vocab.txt", "BERT's WordPiece vocabulary: its tokenizer", "≈230 kB",
                   HF + "google-bert/bert-base-uncased")),
        "All three side by side: ImageReward.pt and med_config.json in the folder, vocab.txt in a sub-folder "
        "bert-base-uncased/. The image-reward package is not needed.",
        "yes", "Apache-2.0 (ImageReward repository)"),
)}


def missing_file_message(folder: str, filename: str, searched: list[str], found: list[str]) -> str:
    """The error for a weights file that is in none of the folder's search paths."""
    text = (f"{filename} is missing: put it in models/{folder} (searched: {', '.join(searched) or 'no folder'}; "
            f"files found there: {', '.join(found) if found else 'none'}).")
    entry = REWARD_FOLDERS.get(folder)
    if entry is not None:
        text += " " + entry.describe()
    return text + (f" A folder named '{folder}' in extra_model_paths.yaml is searched too; after adding a file, "
                   "press R in the page to refresh the file lists.")


def missing_companions_message(reward: str, weights_name: str, where: str, missing: list[ModelFile]) -> str:
    """The error for files that must sit beside the weights file (configs, tokenizers)."""
    return (f"{reward} needs {' and '.join(f.name for f in missing)} beside {weights_name} in {where}: "
            + "; ".join(f.describe() for f in missing) + ".")
