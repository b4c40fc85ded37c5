"""Headless OpenGL renderer (moderngl + EGL) for templates, synthetic data and pose scoring.

One draw call per object writes, with multiple render targets,

* attachment 0, RGBA8:    shaded colour (Lambert ambient + diffuse, optional Blinn-Phong specular),
* attachment 1, RGBA32F:  model-frame xyz (metres) of the surface point and its camera z (metres),
* attachment 2, R32F:     instance id (index into ``objects`` + 1),

with a depth renderbuffer for the z-test. Depth is the interpolated camera-space z written by the
fragment shader (exact up to float32), not a value recovered from the non-linear depth buffer.

Projection: built from ``K`` so that the OpenCV/BOP pixel-centre convention holds exactly (pixel
column ``u`` is covered when the projected surface covers the point ``u``, no half-pixel shift).
The camera frame is OpenCV (x right, y down, z forward); clip ``w`` is the camera z. Image row ``v``
is mapped to GL window row ``v`` (GL's y-up NDC flip and the bottom-up read-back flip cancel), so
the read-back arrays are already top-down and need no row flip. Triangle winding therefore appears
mirrored to GL, which does not matter: face culling is off and lighting is two-sided.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from osop_ros.core.types import InvalidInputError, OsopError, RenderOutput

if TYPE_CHECKING:  # annotations only; the renderer reads the ObjectModel attributes listed in the API contract
    import moderngl

    from osop_ros.core.mesh import ObjectModel


class RendererError(OsopError):
    """No usable OpenGL context, or the renderer was used after :meth:`Renderer.release`."""


class UnknownObjectError(OsopError, KeyError):
    """``render`` was asked for an object key that was never added."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


_VERTEX_SHADER = """
#version 330
uniform mat4 T_cam_obj;  // model -> OpenCV camera (metres)
uniform mat4 P;          // OpenCV camera -> GL clip space (built from K)
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_color;
in vec2 in_uv;
out vec3 v_pos_cam;
out vec3 v_pos_obj;
out vec3 v_normal_cam;
out vec3 v_color;
out vec2 v_uv;
void main() {
    vec4 p_cam = T_cam_obj * vec4(in_pos, 1.0);
    v_pos_cam = p_cam.xyz;
    v_pos_obj = in_pos;
    v_normal_cam = mat3(T_cam_obj) * in_normal;
    v_color = in_color;
    v_uv = in_uv;
    gl_Position = P * p_cam;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform int color_mode;     // 0: uniform albedo, 1: vertex colours, 2: texture
uniform vec3 albedo;
uniform sampler2D tex;
uniform int headlight;      // 1: point light at the camera centre, 0: directional light_dir
uniform vec3 to_light;      // unit direction towards the light (camera frame), when headlight == 0
uniform float ambient;
uniform float diffuse;
uniform float specular;
uniform float shininess;
uniform float inst_id;
in vec3 v_pos_cam;
in vec3 v_pos_obj;
in vec3 v_normal_cam;
in vec3 v_color;
in vec2 v_uv;
layout(location = 0) out vec4 out_rgb;
layout(location = 1) out vec4 out_xyzd;
layout(location = 2) out float out_inst;
void main() {
    vec3 base;
    if (color_mode == 2) {
        base = texture(tex, vec2(v_uv.x, 1.0 - v_uv.y)).rgb;  // uv origin bottom-left, image row 0 on top
    } else if (color_mode == 1) {
        base = v_color;
    } else {
        base = albedo;
    }
    vec3 V = normalize(-v_pos_cam);
    vec3 n = v_normal_cam;
    float nl = length(n);
    n = nl > 1e-12 ? n / nl : V;
    if (dot(n, V) < 0.0) n = -n;  // two-sided lighting
    vec3 L = headlight == 1 ? V : to_light;
    vec3 c = base * (ambient + diffuse * max(dot(n, L), 0.0));
    if (specular > 0.0) {
        vec3 H = normalize(L + V);
        c += vec3(specular * pow(max(dot(n, H), 0.0), shininess));
    }
    out_rgb = vec4(clamp(c, 0.0, 1.0), 1.0);
    out_xyzd = vec4(v_pos_obj, v_pos_cam.z);
    out_inst = inst_id;
}
"""

_MAX_CACHED_FBOS = 8


@dataclass
class _GpuObject:
    vbo: Any
    ibo: Any
    vao: Any
    texture: Any | None
    color_mode: int  # 0 uniform grey, 1 vertex colours, 2 texture


@dataclass
class _Targets:
    fbo: Any
    attachments: list[Any]


def projection_from_K(K: np.ndarray, width: int, height: int, znear: float, zfar: float) -> np.ndarray:
    """(4, 4) float64 matrix mapping OpenCV camera coordinates (metres) to GL clip space.

    ``x_ndc = (2 u + 1) / W - 1`` with ``u = fx x / z + cx``, so pixel column ``u`` (centre at window
    coordinate ``u + 0.5``) is hit exactly where the pinhole model projects; the same for rows, with image
    row ``v`` stored as GL row ``v`` (read back top-down, no flip). ``w_clip = z``; z in [znear, zfar] maps
    to NDC depth [-1, 1].
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    P = np.zeros((4, 4), dtype=np.float64)
    P[0, 0] = 2.0 * fx / width
    P[0, 2] = (2.0 * cx + 1.0) / width - 1.0
    P[1, 1] = 2.0 * fy / height
    P[1, 2] = (2.0 * cy + 1.0) / height - 1.0
    P[2, 2] = (zfar + znear) / (zfar - znear)
    P[2, 3] = -2.0 * zfar * znear / (zfar - znear)
    P[3, 2] = 1.0
    return P


def _validate_K(K: Any) -> np.ndarray:
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"K must be a (3, 3) numeric matrix: {e}") from e
    if K.shape != (3, 3):
        raise InvalidInputError(f"K must have shape (3, 3), got {K.shape}")
    if not np.all(np.isfinite(K)):
        raise InvalidInputError("K contains non-finite values")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InvalidInputError(f"K focal lengths must be > 0, got fx={K[0, 0]} fy={K[1, 1]}")
    if abs(K[0, 1]) > 1e-6 or np.any(np.abs(K[2] - (0.0, 0.0, 1.0)) > 1e-9) or K[1, 0] != 0.0:
        raise InvalidInputError(f"K must be a pinhole matrix [[fx,0,cx],[0,fy,cy],[0,0,1]], got {K.tolist()}")
    return K


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (fallback when a model carries none)."""
    n = np.zeros_like(vertices, dtype=np.float64)
    if len(faces):
        v = vertices.astype(np.float64)
        fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
        for k in range(3):
            np.add.at(n, faces[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return (n / np.maximum(norm, 1e-30)).astype(np.float32)


class Renderer:
    """Offscreen renderer on a standalone OpenGL 3.3 context (EGL by default: Mesa llvmpipe or NVIDIA).

    Not thread-safe: use one instance per thread (the context is made current on each call).
    Usage::

        with Renderer() as r:
            r.add_object("duck", model)
            out = r.render(K, 640, 480, [("duck", T_cam_obj)])
    """

    def __init__(self, backend: str = "egl") -> None:
        try:
            import moderngl
        except ImportError as e:  # pragma: no cover - moderngl is a hard dependency
            raise RendererError(f"moderngl is not installed ({e}); run scripts/setup_env.sh") from e
        self._mgl = moderngl
        kwargs: dict[str, Any] = {"require": 330}
        if backend:
            kwargs["backend"] = backend
        try:
            self._ctx: moderngl.Context | None = moderngl.create_standalone_context(**kwargs)
        except Exception as e:
            raise RendererError(
                f"could not create a headless OpenGL >= 3.3 context with backend {backend!r}: {e}. "
                "Install Mesa EGL (apt: libegl1 libegl-mesa0 libgl1-mesa-dri) or an NVIDIA driver with EGL, "
                "or set EGL_PLATFORM=surfaceless if a display variable confuses EGL."
            ) from e
        ctx = self._ctx
        try:
            self._prog = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        except Exception as e:
            ctx.release()
            self._ctx = None
            raise RendererError(f"shader compilation failed on {ctx.info.get('GL_RENDERER', '?')}: {e}") from e
        self._u = {name: self._prog[name] for name in (
            "T_cam_obj", "P", "color_mode", "albedo", "headlight", "to_light", "ambient", "diffuse",
            "specular", "shininess", "inst_id",
        )}
        self._prog["tex"].value = 0
        self._u["shininess"].value = 32.0
        self._objects: dict[str, _GpuObject] = {}
        self._targets: OrderedDict[tuple[int, int], _Targets] = OrderedDict()
        self.gl_renderer: str = str(ctx.info.get("GL_RENDERER", "unknown"))
        self._max_size = int(ctx.info.get("GL_MAX_RENDERBUFFER_SIZE", 8192))

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _context(self) -> moderngl.Context:
        if self._ctx is None:
            raise RendererError("renderer used after release()")
        return self._ctx

    def release(self) -> None:
        """Free every GL object and the context. Idempotent."""
        if self._ctx is None:
            return
        with self._ctx:
            for key in list(self._objects):
                self._release_object(key)
            for t in self._targets.values():
                t.fbo.release()
                for a in t.attachments:
                    a.release()
            self._targets.clear()
            self._prog.release()
        self._ctx.release()
        self._ctx = None

    # ------------------------------------------------------------------ objects
    def has_object(self, key: str) -> bool:
        return key in self._objects

    def _release_object(self, key: str) -> None:
        obj = self._objects.pop(key)
        obj.vao.release()
        obj.vbo.release()
        obj.ibo.release()
        if obj.texture is not None:
            obj.texture.release()

    def add_object(self, key: str, model: ObjectModel) -> None:
        """Upload ``model`` (vertices, faces, normals, vertex_colors, uv, texture) under ``key``.

        Re-adding an existing key replaces it. Colour source: texture if ``uv`` and ``texture`` are set,
        else vertex colours, else uniform grey 0.7.
        """
        ctx = self._context()
        verts = np.asarray(model.vertices, dtype=np.float32)
        faces = np.asarray(model.faces)
        if verts.ndim != 2 or verts.shape[1] != 3 or not np.all(np.isfinite(verts)):
            raise InvalidInputError(f"object {key!r}: vertices must be finite (N, 3), got {verts.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise InvalidInputError(f"object {key!r}: faces must be (M, 3), got {faces.shape}")
        n = len(verts)
        if len(faces) and (faces.min() < 0 or faces.max() >= n):
            raise InvalidInputError(f"object {key!r}: face indices out of range [0, {n})")
        normals = getattr(model, "normals", None)
        if normals is None or np.shape(normals) != (n, 3):
            normals = _vertex_normals(verts, faces)
        colors = getattr(model, "vertex_colors", None)
        uv = getattr(model, "uv", None)
        texture = getattr(model, "texture", None)

        data = np.zeros((n, 11), dtype=np.float32)
        data[:, 0:3] = verts
        data[:, 3:6] = np.asarray(normals, dtype=np.float32)
        color_mode = 0
        if uv is not None and texture is not None:
            uv = np.asarray(uv, dtype=np.float32)
            tex_img = np.asarray(texture)
            if uv.shape != (n, 2):
                raise InvalidInputError(f"object {key!r}: uv must be ({n}, 2), got {uv.shape}")
            if tex_img.ndim != 3 or tex_img.shape[2] not in (3, 4) or tex_img.shape[0] < 1 or tex_img.shape[1] < 1:
                raise InvalidInputError(f"object {key!r}: texture must be (H, W, 3) uint8, got {tex_img.shape}")
            data[:, 9:11] = uv
            color_mode = 2
        elif colors is not None:
            colors = np.asarray(colors)
            if colors.ndim != 2 or colors.shape[0] != n or colors.shape[1] not in (3, 4):
                raise InvalidInputError(f"object {key!r}: vertex_colors must be ({n}, 3) uint8, got {colors.shape}")
            data[:, 6:9] = colors[:, :3].astype(np.float32) / 255.0
            color_mode = 1

        with ctx:
            if key in self._objects:
                self._release_object(key)
            tex = None
            if color_mode == 2:
                img = np.ascontiguousarray(tex_img[:, :, :3], dtype=np.uint8)
                tex = ctx.texture((img.shape[1], img.shape[0]), 3, img.tobytes(), alignment=1)
                tex.build_mipmaps()
                tex.filter = (self._mgl.LINEAR_MIPMAP_LINEAR, self._mgl.LINEAR)
                tex.repeat_x = tex.repeat_y = True
            vbo = ctx.buffer(data.tobytes())
            ibo = ctx.buffer(np.ascontiguousarray(faces, dtype=np.int32).tobytes() if len(faces) else b"\0" * 12)
            vao = ctx.vertex_array(
                self._prog,
                [(vbo, "3f 3f 3f 2f", "in_pos", "in_normal", "in_color", "in_uv")],
                index_buffer=ibo,
                index_element_size=4,
            )
            vao.vertices = 3 * len(faces)
            self._objects[key] = _GpuObject(vbo, ibo, vao, tex, color_mode)

    # ------------------------------------------------------------------ rendering
    def _get_targets(self, width: int, height: int) -> _Targets:
        key = (width, height)
        t = self._targets.get(key)
        if t is not None:
            self._targets.move_to_end(key)
            return t
        ctx = self._context()
        size = (width, height)
        atts = [
            ctx.renderbuffer(size, components=4, dtype="f1"),
            ctx.renderbuffer(size, components=4, dtype="f4"),
            ctx.renderbuffer(size, components=1, dtype="f4"),
        ]
        depth = ctx.depth_renderbuffer(size)
        fbo = ctx.framebuffer(color_attachments=atts, depth_attachment=depth)
        t = _Targets(fbo, [*atts, depth])
        self._targets[key] = t
        while len(self._targets) > _MAX_CACHED_FBOS:
            _, old = self._targets.popitem(last=False)
            old.fbo.release()
            for a in old.attachments:
                a.release()
        return t

    def render(
        self,
        K: np.ndarray,
        width: int,
        height: int,
        objects: Sequence[tuple[str, np.ndarray]],
        *,
        light_dir_cam: np.ndarray | None = None,
        ambient: float = 0.5,
        diffuse: float = 0.5,
        specular: float = 0.0,
        albedo: Sequence[np.ndarray | None] | None = None,
        znear: float = 0.01,
        zfar: float = 20.0,
    ) -> RenderOutput:
        """Render ``objects`` = [(key, T_cam_obj (4, 4) metres), ...] with intrinsics ``K`` into W x H images.

        light_dir_cam: (3,) direction in which the light travels, camera frame (e.g. (0, 0, 1): shining
            along the optical axis); None = point light at the camera centre (headlight).
        ambient, diffuse, specular: shading weights; colour = albedo * (ambient + diffuse * max(n.l, 0))
            + specular * (n.h)^32, clamped to [0, 1]. Lighting is two-sided.
        albedo: per object (3,) RGB in [0, 1] overriding its colours, or None to keep them.
        znear, zfar: clipping range in metres.
        Returns :class:`RenderOutput` (rgb uint8, depth float32 z m, mask, xyz float32 model frame m, inst int32).
        """
        ctx = self._context()
        K = _validate_K(K)
        if int(width) != width or int(height) != height or width < 1 or height < 1:
            raise InvalidInputError(f"image size must be positive integers, got {width}x{height}")
        width, height = int(width), int(height)
        if width > self._max_size or height > self._max_size:
            raise InvalidInputError(f"image size {width}x{height} exceeds the GL limit {self._max_size}")
        if not (0.0 < znear < zfar and math.isfinite(zfar)):
            raise InvalidInputError(f"need 0 < znear < zfar, got znear={znear} zfar={zfar}")
        if albedo is not None and len(albedo) != len(objects):
            raise InvalidInputError(f"albedo has {len(albedo)} entries for {len(objects)} objects")
        poses = []
        for i, item in enumerate(objects):
            try:
                key, T = item
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"objects[{i}] must be a (key, T_cam_obj) pair") from e
            if key not in self._objects:
                known = sorted(self._objects)
                shown = ", ".join(map(repr, known[:10])) + (", ..." if len(known) > 10 else "")
                raise UnknownObjectError(f"object {key!r} was not added to the renderer (known: {shown or 'none'})")
            T = np.asarray(T, dtype=np.float64)
            if T.shape != (4, 4) or not np.all(np.isfinite(T)):
                raise InvalidInputError(f"objects[{i}] ({key!r}): T_cam_obj must be a finite (4, 4) matrix")
            poses.append((self._objects[key], T))
        albedos: list[np.ndarray | None] = [None] * len(objects)
        if albedo is not None:
            for i, a in enumerate(albedo):
                if a is not None:
                    a = np.asarray(a, dtype=np.float32).reshape(-1)
                    if a.shape != (3,) or not np.all(np.isfinite(a)):
                        raise InvalidInputError(f"albedo[{i}] must be 3 finite floats in [0, 1]")
                    albedos[i] = np.clip(a, 0.0, 1.0)
        if light_dir_cam is None:
            headlight, to_light = 1, np.array([0.0, 0.0, -1.0])
        else:
            d = np.asarray(light_dir_cam, dtype=np.float64).reshape(-1)
            nd = np.linalg.norm(d) if d.shape == (3,) else 0.0
            if not (np.isfinite(nd) and nd > 0):
                raise InvalidInputError(f"light_dir_cam must be a non-zero (3,) vector, got {light_dir_cam!r}")
            headlight, to_light = 0, -d / nd

        P = projection_from_K(K, width, height, float(znear), float(zfar))
        u = self._u
        with ctx:
            targets = self._get_targets(width, height)
            fbo = targets.fbo
            fbo.use()
            fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            ctx.enable_only(self._mgl.DEPTH_TEST)
            u["P"].write(P.T.astype(np.float32).tobytes())
            u["headlight"].value = headlight
            u["to_light"].value = tuple(float(x) for x in to_light)
            u["ambient"].value = float(ambient)
            u["diffuse"].value = float(diffuse)
            u["specular"].value = float(specular)
            for i, (obj, T) in enumerate(poses):
                u["T_cam_obj"].write(T.T.astype(np.float32).tobytes())
                u["inst_id"].value = float(i + 1)
                if albedos[i] is not None:
                    u["color_mode"].value = 0
                    u["albedo"].value = tuple(float(x) for x in albedos[i])
                else:
                    u["color_mode"].value = obj.color_mode
                    u["albedo"].value = (0.7, 0.7, 0.7)
                if obj.color_mode == 2:
                    obj.texture.use(0)
                if obj.vao.vertices:
                    obj.vao.render(self._mgl.TRIANGLES)

            rgb = np.empty((height, width, 3), dtype=np.uint8)
            fbo.read_into(rgb, components=3, attachment=0, dtype="f1")
            xyzd = np.empty((height, width, 4), dtype=np.float32)
            fbo.read_into(xyzd, components=4, attachment=1, dtype="f4")
            depth = np.ascontiguousarray(xyzd[:, :, 3])
            mask = depth > 0
            if len(poses) > 1:
                inst_f = np.empty((height, width), dtype=np.float32)
                fbo.read_into(inst_f, components=1, attachment=2, dtype="f4")
                inst = inst_f.astype(np.int32)
            else:  # a single object: the instance map is the mask, skip one read-back
                inst = mask.astype(np.int32)
        xyz = np.ascontiguousarray(xyzd[:, :, :3])
        return RenderOutput(rgb=rgb, depth=depth, mask=mask, xyz=xyz, inst=inst)
