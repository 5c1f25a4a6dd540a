# Source on the lent GPU box: the box ships torch and transformers 5.17.0 (the pinned version), so no call carries
# a transformers wheel any more; wheels the box lacks (.whl/*.whl, if any) go into /tmp/site, no network.
carried=$(ls .whl/*.whl 2>/dev/null | grep -vE '/(transformers|tokenizers|huggingface_hub)-')
if [ -n "$carried" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $carried
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 -c "import transformers as t; print('transformers', t.__version__)
if t.__version__ != '5.17.0': print('warning: flare-exp pins transformers 5.17.0')"
