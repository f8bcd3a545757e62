"""rl-align: preference alignment and safe policy optimization on MuJoCo."""

__version__ = "0.1.0"


def _register_cost_tasks() -> None:
    """Gymnasium ids ``rl_align/<Task>Velocity-v5`` for other libraries (SB3, CleanRL-style scripts):
    registration only; the entry point is a string, so nothing heavy is imported here."""
    import gymnasium

    for family in ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Swimmer", "Humanoid"):  # registration.VELOCITY_TASKS
        env_id = f"rl_align/{family}Velocity-v5"
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point="rl_align.envs.registration:make_velocity_env",
                               kwargs={"task": f"{family}-v5"}, max_episode_steps=1000)


_register_cost_tasks()
