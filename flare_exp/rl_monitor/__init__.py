"""Watching training: readable GRPO rollouts (:mod:`.rollouts`, :mod:`.rollouts_html`), task metrics on a
held-out subset during training with the best/ adapter (:mod:`.heldout`, :mod:`.heldout_watch`; rl and sft), and
the reward-hacking alarm (:mod:`.alarm`). The rl stage attaches them as Trainer callbacks
(:func:`.callbacks.build_monitor`), the sft stage the held-out watch."""
