"""The trainer every task shares: set-up, one jitted step, the loop."""
from mae_jax.trainer.loop import train_and_evaluate
from mae_jax.trainer.setup import Plan, plan_and_optimizer, plan_run
from mae_jax.trainer.step import State, abstract_state, create_state, make_train_step

__all__ = ["train_and_evaluate", "Plan", "plan_and_optimizer", "plan_run", "State",
           "abstract_state", "create_state", "make_train_step"]
