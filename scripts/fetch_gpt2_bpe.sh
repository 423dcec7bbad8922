#!/usr/bin/env bash
# Fetch the GPT-2 BPE table (gpt2.tiktoken) without reaching tiktoken's blob store: the openai-whisper
# source package on PyPI ships it. Usage: bash scripts/fetch_gpt2_bpe.sh [DEST_DIR]  (default .assets)
# Then: python train.py data.tokenizer=tiktoken_file data.tokenizer_file=DEST_DIR/gpt2.tiktoken
set -euo pipefail
dest=${1:-.assets}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --no-binary=:all: openai-whisper==20250625 -d "$tmp"
mkdir -p "$dest"
tar xzf "$tmp"/openai_whisper-*.tar.gz -C "$tmp" --wildcards '*/whisper/assets/gpt2.tiktoken'
mv "$tmp"/openai_whisper-*/whisper/assets/gpt2.tiktoken "$dest/gpt2.tiktoken.tmp"
mv "$dest/gpt2.tiktoken.tmp" "$dest/gpt2.tiktoken"
echo "$dest/gpt2.tiktoken"
