"""Headless renderer: exact depth/xyz, pixel-centre convention, occlusion, colours, textures, errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import trimesh
from PIL import Image

from osop_ros.core import geometry as g
from osop_ros.core.mesh import ObjectModel
from osop_ros.core.render import Renderer, RendererError, projection_from_K
from osop_ros.core.types import InvalidInputError, OsopError

pytestmark = pytest.mark.gl

TOL_M = 1e-4  # 0.1 mm


@pytest.fixture(scope="module")
def renderer():
    try:
        r = Renderer()
    except RendererError as e:
        pytest.skip(f"no headless OpenGL (EGL) context: {e}")
    yield r
    r.release()


def _K(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _box(extents=(0.1, 0.08, 0.06), flat: bool = False, colors: np.ndarray | None = None) -> ObjectModel:
    m = trimesh.creation.box(extents=extents)
    if flat:  # one vertex per face corner: flat normals
        m.unmerge_vertices()
    if colors is not None:
        m.visual.vertex_colors = colors(m.vertices) if callable(colors) else colors
    return ObjectModel.from_trimesh(m, name="box")


def _T(R: np.ndarray | None = None, t=(0.0, 0.0, 0.7)) -> np.ndarray:
    return g.make_T(np.eye(3) if R is None else R, t)


# Intrinsics/sizes: a crop, a non-square image with an off-centre principal point, a wide strip.
CAMERAS = [
    (_K(120.0, 120.0, 31.5, 31.5), 64, 64),
    (_K(500.0, 520.0, 71.3, 66.8), 160, 120),
    (_K(300.0, 280.0, 150.3, 20.7), 200, 90),
]


def test_projection_matrix_maps_pixel_centres():
    K = _K(500.0, 520.0, 71.3, 66.8)
    W, H = 160, 120
    P = projection_from_K(K, W, H, 0.01, 20.0)
    p_cam = np.array([[0.03, -0.02, 0.9], [-0.1, 0.05, 2.0]])
    uv = g.project(K, p_cam)
    clip = np.c_[p_cam, np.ones(2)] @ P.T
    ndc = clip[:, :3] / clip[:, 3:]
    win = (ndc[:, :2] + 1.0) / 2.0 * np.array([W, H])  # GL window coords, pixel centres at i + 0.5
    np.testing.assert_allclose(win - 0.5, uv, atol=1e-9)
    assert np.all(np.abs(ndc[:, 2]) < 1.0)


@pytest.mark.parametrize("cam", CAMERAS, ids=["crop64", "offcentre160x120", "strip200x90"])
def test_box_fronto_parallel_depth_xyz_and_silhouette(renderer, cam):
    K, W, H = cam
    ext = np.array([0.1, 0.08, 0.06])
    model = _box(ext)
    renderer.add_object("box", model)
    # camera inside the box's x/y extrusion -> only the front face (z = t_z - 0.03) is visible
    t = np.array([0.013, -0.021, 0.7 if W > 64 else 0.9])
    T = _T(t=t)
    out = renderer.render(K, W, H, [("box", T)])
    assert out.rgb.shape == (H, W, 3) and out.rgb.dtype == np.uint8
    assert out.depth.shape == (H, W) and out.depth.dtype == np.float32
    assert out.xyz.shape == (H, W, 3) and out.xyz.dtype == np.float32
    assert out.inst.dtype == np.int32 and out.mask.dtype == bool
    np.testing.assert_array_equal(out.mask, out.depth > 0)
    np.testing.assert_array_equal(out.mask, out.inst > 0)

    z_face = t[2] - ext[2] / 2
    assert np.abs(out.depth[out.mask] - z_face).max() < TOL_M
    # expected silhouette: pixel centres inside the projected front face (exact, no half-pixel shift)
    corners = np.array([[-ext[0] / 2, -ext[1] / 2, -ext[2] / 2], [ext[0] / 2, ext[1] / 2, -ext[2] / 2]])
    (u0, v0), (u1, v1) = g.project_points(K, T, corners)
    uu, vv = np.meshgrid(np.arange(W), np.arange(H))
    expected = (uu >= u0) & (uu <= u1) & (vv >= v0) & (vv <= v1)
    assert expected.sum() > 50
    np.testing.assert_array_equal(out.mask, expected)
    box = g.mask_to_box(out.mask)
    assert abs(box[0] - u0) <= 1.0 and abs(box[2] - 1 - u1) <= 1.0  # bbox within the projected bbox
    # xyz: back-project depth, go to the model frame
    v, u = np.nonzero(out.mask)
    pts_cam = g.backproject(np.c_[u, v], out.depth[v, u], K)
    pts_obj = g.transform_points(g.invert_T(T), pts_cam)
    assert np.abs(pts_obj - out.xyz[v, u]).max() < TOL_M
    assert np.abs(out.xyz[v, u, 2] + ext[2] / 2).max() < 1e-6
    assert np.all(out.xyz[~out.mask] == 0) and np.all(out.rgb[~out.mask] == 0)


@pytest.mark.parametrize("cam", CAMERAS[1:], ids=["offcentre160x120", "strip200x90"])
def test_rotated_box_silhouette_is_projected_hull(renderer, cam):
    K, W, H = cam
    rng = np.random.default_rng(3)
    model = _box((0.06, 0.05, 0.04))
    renderer.add_object("box", model)
    for _ in range(3):
        T = _T(g.random_rotation(rng), t=(0.01, 0.005, 0.6 if W == 160 else 0.8))
        out = renderer.render(K, W, H, [("box", T)])
        uv = g.project_points(K, T, model.vertices)
        hull = cv2.convexHull(uv.astype(np.float32))
        uu, vv = np.meshgrid(np.arange(W), np.arange(H))
        pix = np.c_[uu.ravel(), vv.ravel()].astype(np.float32)
        dist = np.array([cv2.pointPolygonTest(hull, (float(x), float(y)), True) for x, y in pix]).reshape(H, W)
        inside, outside = dist > 0.02, dist < -0.02
        assert inside.sum() > 100
        assert out.mask[inside].all(), "pixel centre inside the projected silhouette not rendered"
        assert not out.mask[outside].any(), "pixel centre outside the projected silhouette rendered"
        # xyz <-> depth consistency on a tilted surface, and points lie on the box surface
        v, u = np.nonzero(out.mask)
        pts_obj = g.transform_points(g.invert_T(T), g.backproject(np.c_[u, v], out.depth[v, u], K))
        assert np.abs(pts_obj - out.xyz[v, u]).max() < TOL_M
        rel = np.abs(out.xyz[v, u]) / (np.array([0.06, 0.05, 0.04]) / 2)
        assert np.abs(rel.max(axis=1) - 1.0).max() < 1e-3


def test_sphere_depth_matches_ray_intersection(renderer):
    r = 0.05
    model = ObjectModel.from_trimesh(trimesh.creation.icosphere(subdivisions=5, radius=r), name="sphere")
    renderer.add_object("sphere", model)
    K, W, H = _K(400.0, 410.0, 70.2, 55.7), 150, 110
    c = np.array([0.012, -0.008, 0.55])
    out = renderer.render(K, W, H, [("sphere", _T(t=c))])
    v, u = np.nonzero(out.mask)
    d = np.c_[(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones(len(u))]  # rays with z = 1
    # |s d - c|^2 = r^2, nearest root s = depth
    a, b, cc = (d * d).sum(1), -2 * d @ c, c @ c - r * r
    disc = b * b - 4 * a * cc
    interior = disc > 0
    s = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    # distance of the ray from the centre < 0.8 r: away from grazing incidence
    dist_axis = np.linalg.norm(np.cross(d / np.linalg.norm(d, axis=1, keepdims=True), c), axis=1)
    interior &= dist_axis < 0.8 * r
    assert interior.sum() > 1000
    err = out.depth[v, u][interior] - s[interior]
    assert np.abs(err).max() < TOL_M
    assert err.min() > -1e-6  # the inscribed polyhedron is never in front of the sphere
    pts_obj = g.transform_points(g.invert_T(_T(t=c)), g.backproject(np.c_[u, v], out.depth[v, u], K))
    assert np.abs(pts_obj - out.xyz[v, u]).max() < TOL_M
    # no pixel outside the true sphere silhouette
    assert np.all(disc > -1e-9)


def test_two_objects_occlusion(renderer):
    renderer.add_object("near", _box((0.04, 0.04, 0.04)))
    renderer.add_object("far", _box((0.12, 0.1, 0.04)))
    K, W, H = _K(300.0, 300.0, 64.3, 47.6), 128, 96
    T_near = _T(t=(0.02, 0.0, 0.5))
    T_far = _T(t=(0.0, 0.0, 0.8))
    for order in ((("near", T_near), ("far", T_far)), (("far", T_far), ("near", T_near))):
        out = renderer.render(K, W, H, list(order))
        i_near = 1 + [k for k, _ in order].index("near")
        i_far = 1 + [k for k, _ in order].index("far")
        np.testing.assert_array_equal(out.mask, out.depth > 0)
        np.testing.assert_array_equal(out.mask, out.inst > 0)
        assert set(np.unique(out.inst)) == {0, i_near, i_far}
        solo_near = renderer.render(K, W, H, [("near", T_near)])
        solo_far = renderer.render(K, W, H, [("far", T_far)])
        overlap = solo_near.mask & solo_far.mask
        assert overlap.sum() > 100
        # the nearer object wins wherever it is present
        np.testing.assert_array_equal(out.inst == i_near, solo_near.mask)
        np.testing.assert_array_equal(out.inst == i_far, solo_far.mask & ~solo_near.mask)
        assert np.abs(out.depth[overlap] - 0.48).max() < TOL_M
        far_only = out.inst == i_far
        assert np.abs(out.depth[far_only] - 0.78).max() < TOL_M
        np.testing.assert_allclose(out.xyz[overlap], solo_near.xyz[overlap], atol=1e-6)


def test_vertex_colours_albedo_and_default_grey(renderer):
    ext = np.array([0.1, 0.08, 0.06])

    def colors(vs):
        c = np.zeros((len(vs), 4), np.uint8)
        c[:, 0] = np.where(vs[:, 0] > 0, 255, 0)
        c[:, 1] = np.where(vs[:, 1] > 0, 255, 0)
        c[:, 2] = 128
        c[:, 3] = 255
        return c

    renderer.add_object("cbox", _box(ext, colors=colors))
    K, W, H = _K(300.0, 310.0, 60.4, 50.9), 120, 100
    T = _T(t=(0.0, 0.0, 0.7))
    out = renderer.render(K, W, H, [("cbox", T)], ambient=1.0, diffuse=0.0)
    m = out.mask
    xyz = out.xyz[m].astype(np.float64)
    exp_r = 255.0 * (xyz[:, 0] + ext[0] / 2) / ext[0]
    exp_g = 255.0 * (xyz[:, 1] + ext[1] / 2) / ext[1]
    rgb = out.rgb[m].astype(np.float64)
    assert np.abs(rgb[:, 0] - exp_r).max() <= 1.5
    assert np.abs(rgb[:, 1] - exp_g).max() <= 1.5
    assert np.abs(rgb[:, 2] - 128).max() <= 1

    out = renderer.render(K, W, H, [("cbox", T)], ambient=1.0, diffuse=0.0, albedo=[np.array([0.2, 0.4, 0.6])])
    assert np.abs(out.rgb[out.mask].astype(int) - [51, 102, 153]).max() <= 1

    renderer.add_object("grey", _box(ext, flat=True))
    out = renderer.render(K, W, H, [("grey", T)], ambient=1.0, diffuse=0.0)
    assert np.abs(out.rgb[out.mask].astype(int) - 178.5).max() <= 1
    # directional light along the optical axis: the front face (normal -z) is fully lit
    out = renderer.render(K, W, H, [("grey", T)], light_dir_cam=np.array([0.0, 0.0, 1.0]), ambient=0.3, diffuse=0.7)
    assert np.abs(out.rgb[out.mask].astype(int) - 178.5).max() <= 1
    # grazing light: only ambient
    out = renderer.render(K, W, H, [("grey", T)], light_dir_cam=np.array([1.0, 0.0, 0.0]), ambient=0.3, diffuse=0.7)
    assert np.abs(out.rgb[out.mask].astype(int) - 0.7 * 0.3 * 255).max() <= 1
    # headlight (default): brightest where the face is seen head-on, darker towards the edges; specular adds light
    out = renderer.render(K, W, H, [("grey", T)])
    spec = renderer.render(K, W, H, [("grey", T)], specular=0.3)
    assert out.rgb[m].mean() < 179 and out.rgb[m].min() > 150
    assert spec.rgb[m].astype(int).sum() > out.rgb[m].astype(int).sum()


def test_texture_sampling_and_orientation(renderer):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)  # 8x8 texels, 2x2-texel blocks of one colour
    a = 0.05
    verts = np.array([[-a, -a, 0.0], [a, -a, 0.0], [a, a, 0.0], [-a, a, 0.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.c_[(verts[:, 0] + a) / (2 * a), (a - verts[:, 1]) / (2 * a)]  # top of the quad (y = -a) at v = 1
    mesh = trimesh.Trimesh(verts, faces, process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(tex)))
    model = ObjectModel.from_trimesh(mesh, name="quad")
    assert model.texture is not None and model.uv is not None
    renderer.add_object("quad", model)
    K, W, H = _K(600.0, 600.0, 70.3, 62.8), 140, 130
    T = _T(t=(0.0, 0.0, 0.5))
    out = renderer.render(K, W, H, [("quad", T)], ambient=1.0, diffuse=0.0)
    for i in range(4):
        for j in range(4):
            centre = np.array([[-a + (j + 0.5) * a / 2, -a + (i + 0.5) * a / 2, 0.0]])
            u, v = np.round(g.project_points(K, T, centre)[0]).astype(int)
            assert out.mask[v, u]
            np.testing.assert_allclose(out.rgb[v, u].astype(int), blocks[i, j].astype(int), atol=1)
    # albedo overrides the texture
    out = renderer.render(K, W, H, [("quad", T)], ambient=1.0, diffuse=0.0, albedo=[(1.0, 0.0, 0.0)])
    assert np.all(out.rgb[out.mask] == [255, 0, 0])


def test_empty_scene_and_readd_replaces(renderer):
    K, W, H = _K(100.0, 100.0, 31.5, 31.5), 64, 48
    out = renderer.render(K, W, H, [])
    assert not out.mask.any() and not out.rgb.any() and not out.inst.any() and out.depth.shape == (H, W)
    renderer.add_object("swap", _box((0.02, 0.02, 0.02)))
    small = renderer.render(K, W, H, [("swap", _T(t=(0, 0, 0.5)))]).mask.sum()
    renderer.add_object("swap", _box((0.06, 0.06, 0.02)))
    assert renderer.has_object("swap") and not renderer.has_object("nope")
    big = renderer.render(K, W, H, [("swap", _T(t=(0, 0, 0.5)))]).mask.sum()
    assert big > 4 * small > 0


def test_errors(renderer):
    renderer.add_object("e", _box())
    K = _K(100.0, 100.0, 31.5, 31.5)
    T = _T()
    with pytest.raises(OsopError) as ei:
        renderer.render(K, 64, 64, [("missing", T)])
    assert isinstance(ei.value, KeyError) and "missing" in str(ei.value)
    for bad in (np.eye(2), _K(0.0, 100.0, 1.0, 1.0), _K(np.nan, 100.0, 1.0, 1.0), _K(-5.0, 100.0, 1.0, 1.0)):
        with pytest.raises(InvalidInputError):
            renderer.render(bad, 64, 64, [("e", T)])
    with pytest.raises(InvalidInputError):
        renderer.render(K, 0, 64, [("e", T)])
    with pytest.raises(InvalidInputError):
        renderer.render(K, 64, 64, [("e", np.eye(3))])
    with pytest.raises(InvalidInputError):
        renderer.render(K, 64, 64, [("e", T)], albedo=[None, None])
    with pytest.raises(InvalidInputError):
        renderer.render(K, 64, 64, [("e", T)], znear=1.0, zfar=0.5)
    with pytest.raises(RendererError, match="backend 'no-such-backend'"):
        Renderer(backend="no-such-backend")


def test_no_egl_gives_clear_error(monkeypatch):
    import moderngl

    def fail(**kwargs):
        raise Exception("eglGetDisplay failed")

    monkeypatch.setattr(moderngl, "create_standalone_context", fail)
    with pytest.raises(RendererError, match="EGL"):
        Renderer()


def test_release_is_idempotent_and_blocks_use():
    try:
        r = Renderer()
    except RendererError as e:
        pytest.skip(f"no headless OpenGL (EGL) context: {e}")
    with r:
        r.add_object("b", _box())
        for size in ((32, 32), (64, 48), (32, 32)):
            r.render(_K(80.0, 80.0, 15.5, 15.5), *size, [("b", _T())])
    r.release()
    with pytest.raises(RendererError):
        r.render(_K(80.0, 80.0, 15.5, 15.5), 32, 32, [("b", _T())])
