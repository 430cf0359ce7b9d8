"""Restore and read D4RL dataset states in vgf_offline.py's AntMaze / Adroit adapters (used to replay datasets in
tests/test_d4rl_envs.py; training and evaluation never need it)."""
import numpy as np

import vgf_offline as D


def d4rl_core(env):
    """The D4RLAntMaze / D4RLAdroit layer under TimeLimit (simulator: .model, .data)."""
    while not isinstance(env, (D.D4RLAntMaze, D.D4RLAdroit)):
        env = env.env
    return env


def set_state(core, qpos, qvel, goal=None, **task_keys):
    """Dataset state -> observation. AntMaze: infos/qpos, infos/qvel in D4RL's frame (optional goal=infos/goal).
    Adroit: see adroit_set_state."""
    if isinstance(core, D.D4RLAntMaze):
        obs = core._set_sim(qpos, qvel)
        if goal is not None:
            core.goal = np.array(goal, dtype=np.float64)
        return obs
    return adroit_set_state(core, qpos, qvel, **task_keys)


def adroit_set_state(core, qpos, qvel, desired_orien=None, door_body_pos=None, board_pos=None, obj_pos=None,
                     target_pos=None, obs=None, obs_qpos=None):
    """Model-level task keys as D4RL's set_env_state. Relocate: pass `obs`, the episode's first observation (and
    `obs_qpos`, its infos/qpos, if it is not this row) to rebuild the object and target placement; the stored
    infos/obj_pos is the object's world position, not its body_pos. Only first rows restore their observation
    exactly: after a step, MuJoCo's body/site positions (used in Adroit observations) are those of the last substep's
    start, one substep stale."""
    m, d, u = core.model, core.data, core.env.unwrapped
    for value, array, idx in ((desired_orien, m.body_quat, core.body("target")),
                              (door_body_pos, m.body_pos, core.body("frame")),
                              (board_pos, m.body_pos, core.body("nail_board")),
                              (obj_pos, m.body_pos, core.body("Object")),
                              (target_pos, m.site_pos, core.site("target"))):
        if value is not None:
            array[idx] = value
    if obs is not None and core.task == "relocate":  # obs[30:36] = palm - obj, palm - target (world)
        u.set_state(np.asarray(qpos if obs_qpos is None else obs_qpos, np.float64), np.zeros(m.nv))
        palm, obs = d.site_xpos[core.site("S_grasp")].copy(), np.asarray(obs, np.float64)
        m.body_pos[core.body("Object")] += palm - obs[30:33] - d.xpos[core.body("Object")]
        m.site_pos[core.site("target")] += palm - obs[33:36] - d.site_xpos[core.site("target")]
    d.qacc_warmstart[:] = 0
    u.set_state(np.asarray(qpos, np.float64), np.asarray(qvel, np.float64))  # includes mj_forward
    return u._get_obs()


def get_state(core):
    """D4RL's get_env_state keys for the current Adroit state (what the datasets store under infos/)."""
    m, d = core.model, core.data
    s = {"qpos": d.qpos.copy(), "qvel": d.qvel.copy()}
    if core.task == "pen":
        s["desired_orien"] = m.body_quat[core.body("target")].copy()
    elif core.task == "door":
        s["door_body_pos"] = m.body_pos[core.body("frame")].copy()
    elif core.task == "hammer":
        s["board_pos"] = m.body_pos[core.body("nail_board")].copy()
    else:  # relocate: as D4RL, obj_pos is the object's world position, not its model body_pos
        s["obj_pos"], s["target_pos"] = d.xpos[core.body("Object")].copy(), d.site_xpos[core.site("target")].copy()
    return s


def set_env_state(env, qpos, qvel, **task_keys):
    """Set `env` (made by make_antmaze_env / make_adroit_env) to a dataset state and return the observation."""
    return set_state(d4rl_core(env), qpos, qvel, **task_keys)
