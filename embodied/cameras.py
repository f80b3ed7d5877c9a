"""Cameras: MuJoCo's offscreen renderer inside the simulator actors (CPU: EGL or OSMesa).

A camera name is one of the free cameras defined per env in :data:`VIEWS` (a fixed
look-at point, distance and angles, like MuJoCo's viewer camera) or a camera
declared in the env's MuJoCo model. One :class:`CameraRig` per simulator actor
renders every env of the actor (the envs of an actor share one model), each
camera one ``uint8 (H, W, 3)`` RGB frame per step.

``MUJOCO_GL`` picks the OpenGL backend when ``mujoco`` is imported, so the
simulator actors get it through their runtime environment
(:func:`gl_runtime_env`), never from whatever the worker process happened to
inherit.
"""
from __future__ import annotations

import os

import numpy as np

# env id -> camera name -> free camera (look-at point in metres, distance, azimuth and elevation in degrees)
VIEWS = {
    "Reacher-v5": {
        "top": {"lookat": (0.0, 0.0, 0.0), "distance": 0.65, "azimuth": 90.0, "elevation": -90.0},
        "side": {"lookat": (0.0, 0.0, 0.0), "distance": 0.7, "azimuth": 90.0, "elevation": -45.0},
    },
    "Pusher-v5": {
        "top": {"lookat": (0.4, -0.3, -0.3), "distance": 1.5, "azimuth": 90.0, "elevation": -90.0},
        "front": {"lookat": (0.35, -0.3, -0.3), "distance": 1.6, "azimuth": 180.0, "elevation": -45.0},
    },
}
GL_BACKENDS = ("egl", "osmesa")


def model_cameras(env_id: str) -> list[str]:
    """Names of the cameras declared in the env's MuJoCo model (loads the model)."""
    import mujoco

    from .envs import make_env

    env = make_env(env_id)
    try:
        model = env.unwrapped.model
        return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
    finally:
        env.close()


def check_cameras(env_id: str, names: list[str]) -> None:
    """One-line ValueError unless every name is a camera of ``env_id`` (a view of :data:`VIEWS` or a
    camera of its MuJoCo model); the model is loaded only for names outside the table."""
    if len(set(names)) != len(names):
        raise ValueError(f"cameras.names lists a camera twice: {names}")
    views = VIEWS.get(env_id, {})
    unknown = [n for n in names if n not in views]
    if unknown:
        have = [*views, *model_cameras(env_id)]
        unknown = [n for n in unknown if n not in have]
        if unknown:
            raise ValueError(f"cameras.names: no camera {unknown[0]!r} for {env_id} "
                             f"(have: {', '.join(have) or 'none'})")


def gl_runtime_env(backend: str) -> dict:
    """The runtime environment of a rendering actor: ``MUJOCO_GL`` (the environment's own value wins,
    so a machine that needs another backend can say so), and for OSMesa ``PYOPENGL_PLATFORM``."""
    gl = os.environ.get("MUJOCO_GL") or backend
    env = {"MUJOCO_GL": gl}
    if gl == "osmesa":
        env["PYOPENGL_PLATFORM"] = "osmesa"
    return {"env_vars": env}


class CameraRig:
    """One offscreen renderer for ``names`` on ``model`` (shared by every env with that model)."""

    def __init__(self, env_id: str, model, names: list[str], width: int = 96, height: int = 96,
                 shadows: bool = False):
        import mujoco

        self.names = list(names)
        # the offscreen buffer must hold the frame (MuJoCo's default is 640x480)
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
        try:
            self.renderer = mujoco.Renderer(model, height=height, width=width)
        except Exception as e:  # noqa: BLE001 - GL errors come in many types; one line naming the backend
            raise RuntimeError(f"MuJoCo cannot render offscreen with MUJOCO_GL="
                               f"{os.environ.get('MUJOCO_GL', '(unset)')}: {str(e).splitlines()[0]} "
                               "(install Mesa's EGL: libegl1 libgl1-mesa-dri, or libosmesa6 for osmesa)") from None
        # shadow maps dominate CPU rendering of lit scenes (Pusher: ~10x); off by default
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = int(shadows)
        self.cameras = []
        for name in self.names:
            view = VIEWS.get(env_id, {}).get(name)
            if view is None:
                camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
                if camera_id < 0:
                    raise ValueError(f"no camera {name!r} for {env_id}")
                self.cameras.append(camera_id)
                continue
            camera = mujoco.MjvCamera()
            camera.type = mujoco.mjtCamera.mjCAMERA_FREE
            camera.lookat[:] = view["lookat"]
            camera.distance, camera.azimuth, camera.elevation = view["distance"], view["azimuth"], view["elevation"]
            self.cameras.append(camera)

    def render(self, data) -> dict[str, np.ndarray]:
        """One frame per camera of the state in ``data`` (as MuJoCo last computed its positions)."""
        frames = {}
        for name, camera in zip(self.names, self.cameras):
            self.renderer.update_scene(data, camera=camera)
            frames[name] = self.renderer.render()  # a new array each call
        return frames

    def close(self) -> None:
        self.renderer.close()
