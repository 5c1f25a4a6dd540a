# Source on the lent GPU box: install the carried wheels (.whl/) into /tmp/site, no network.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD && export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  UNSLOTH_DISABLE_STATISTICS=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
