// Open a GLB in a real glTF viewer: three.js's GLTFLoader in headless Chromium (WebGL 2 through
// SwiftShader), the way a web page shows it. Renders it unlit (MeshBasicMaterial with the loaded
// base-colour texture) from a camera on +z looking at the origin, glTF's y up, and prints JSON:
// what the loader found (texture, UVs, metallic/roughness) and the rendered RGBA pixels (base64).
//   NODE_PATH=.tools/viewer/node_modules node scripts/view_glb.mjs model.glb [size]
// `make setup` installs @sparticuz/chromium, puppeteer-core and three into .tools/viewer (npm).
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(path.resolve(process.env.NODE_PATH || 'node_modules', 'x.js'));
const chromium = require('@sparticuz/chromium');
const puppeteer = require('puppeteer-core');
const threeDir = path.resolve(process.env.NODE_PATH || 'node_modules', 'three');
const [glb, size = '128'] = process.argv.slice(2);

const page_html = `<!doctype html><body style="margin:0">
<script type="importmap">{"imports": {"three": "/three/build/three.module.js", "three/addons/": "/three/examples/jsm/"}}</script>
<script type="module">
import * as THREE from 'three';
import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
const size = ${Number(size)};
const renderer = new THREE.WebGLRenderer({ preserveDrawingBuffer: true, antialias: false });
renderer.setSize(size, size);
renderer.outputColorSpace = THREE.LinearSRGBColorSpace;  // pixels as stored, no colour management
document.body.appendChild(renderer.domElement);
new GLTFLoader().load('/model.glb', (gltf) => {
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(1, 1, 1);
  const found = [];
  gltf.scene.traverse((o) => {
    if (!o.isMesh) return;
    const m = o.material;
    found.push({ map: !!m.map, uv: !!o.geometry.attributes.uv, vertices: o.geometry.attributes.position.count,
                 metalness: m.metalness, roughness: m.roughness });
    if (m.map) m.map.colorSpace = THREE.NoColorSpace;
    o.material = new THREE.MeshBasicMaterial({ map: m.map });
  });
  scene.add(gltf.scene);
  const camera = new THREE.PerspectiveCamera(40, 1, 0.1, 10);
  camera.position.set(0, 0, 2.5);
  camera.lookAt(0, 0, 0);
  renderer.render(scene, camera);
  const gl = renderer.getContext();
  const pixels = new Uint8Array(size * size * 4);
  gl.readPixels(0, 0, size, size, gl.RGBA, gl.UNSIGNED_BYTE, pixels);  // rows bottom to top
  window.result = { meshes: found, size, pixels: btoa(String.fromCharCode(...pixels)) };
}, undefined, (e) => { window.result = { error: String(e) }; });
</script></body>`;

const server = http.createServer((req, res) => {
  const url = decodeURIComponent(req.url);
  if (url === '/') { res.setHeader('content-type', 'text/html'); return res.end(page_html); }
  if (url === '/model.glb') return res.end(fs.readFileSync(glb));
  if (url.startsWith('/three/')) {
    res.setHeader('content-type', 'text/javascript');
    return res.end(fs.readFileSync(path.join(threeDir, url.slice('/three/'.length))));
  }
  res.statusCode = 404; res.end();
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const browser = await puppeteer.launch({ executablePath: await chromium.executablePath(), headless: true,
  args: [...chromium.args, '--use-angle=swiftshader', '--enable-unsafe-swiftshader'] });
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction('window.result', { timeout: 60000 });
  const result = await page.evaluate(() => window.result);
  console.log(JSON.stringify({ ...result, browser: await browser.version() }));
} finally {
  await browser.close();
  server.close();
}
