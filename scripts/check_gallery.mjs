// Check gallery pages (a sweep's or a run's index.html) the way a user opens them: from the file
// system (file://) in headless Chromium, with web security on and no network. For each page it
// collects console errors, page errors, failed requests and requests that leave the file system;
// checks that every <img> decodes (naturalWidth > 0) and every <video> loads its first frame
// (videoWidth > 0); that every src/href is relative and names a file that exists, and every #anchor
// an element of the page. Prints JSON and exits 1 when any page has a problem.
//   NODE_PATH=.tools/viewer/node_modules node scripts/check_gallery.mjs outputs/multirun/<time>/index.html [more pages]
// `make setup` installs @sparticuz/chromium and puppeteer-core into .tools/viewer (npm).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';

const require = createRequire(path.resolve(process.env.NODE_PATH || 'node_modules', 'x.js'));
const chromium = require('@sparticuz/chromium');
const puppeteer = require('puppeteer-core');
const pages = process.argv.slice(2);
if (!pages.length) {
  console.error('usage: node scripts/check_gallery.mjs <index.html> [more pages]');
  process.exit(2);
}
const WAIT_MS = 20000; // per image or video

// In the page: wait for an element's load (or its failure), at most WAIT_MS.
const inPage = `window.settle = (el, ok, bad, start) => new Promise((resolve) => {
  const done = (how) => { clearTimeout(timer); resolve(how); };
  const timer = setTimeout(() => done('timeout'), ${WAIT_MS});
  el.addEventListener(ok, () => done('ok'), { once: true });
  el.addEventListener(bad, () => done('error'), { once: true, capture: true });  // a <source>'s error too
  start();
});`;

async function checkImages(page) {
  return page.evaluate(async () => {
    const out = [];
    for (const img of document.querySelectorAll('img')) {
      img.loading = 'eager'; // lazy ones below the fold too
      if (!img.complete) await window.settle(img, 'load', 'error', () => {});
      out.push({ src: img.getAttribute('src'), width: img.naturalWidth, height: img.naturalHeight });
    }
    return out;
  });
}

async function checkVideos(page) {
  return page.evaluate(async () => {
    const out = [];
    for (const v of document.querySelectorAll('video')) {
      const how = v.readyState >= 2 ? 'ok' : await window.settle(v, 'loadeddata', 'error', () => {
        v.preload = 'auto';
        v.load();
      });
      out.push({ src: v.currentSrc || v.querySelector('source')?.getAttribute('src'), how,
                 width: v.videoWidth, height: v.videoHeight, readyState: v.readyState, duration: v.duration });
    }
    return out;
  });
}

async function checkLinks(page, url, problems) {
  const refs = await page.evaluate(() => [...document.querySelectorAll('[href],[src]')].map((el) => {
    const raw = el.getAttribute('href') ?? el.getAttribute('src');
    const target = raw.startsWith('#') && document.getElementById(decodeURIComponent(raw.slice(1)));
    return { tag: el.tagName.toLowerCase(), raw, url: el.href || el.src, anchor: raw.startsWith('#'), target: !!target };
  }));
  for (const r of refs) {
    if (r.anchor) {
      if (!r.target) problems.push(`<${r.tag}> ${r.raw}: no element with that id in the page`);
      continue;
    }
    const resolved = new URL(r.url, url);
    if (resolved.protocol !== 'file:') {
      // a plain link to a web page is allowed; anything the page loads must be local
      if (r.tag !== 'a') problems.push(`<${r.tag}> ${r.raw}: loads from the network; a gallery must work offline`);
      continue;
    }
    if (/^(\/|[a-z]+:)/i.test(r.raw)) problems.push(`<${r.tag}> ${r.raw}: absolute; links must be relative so the folder can move`);
    resolved.hash = '';
    if (!fs.existsSync(fileURLToPath(resolved))) problems.push(`<${r.tag}> ${r.raw}: no such file (${fileURLToPath(resolved)})`);
  }
  return refs.length;
}

async function checkPage(browser, file) {
  const url = pathToFileURL(path.resolve(file)).href;
  const problems = [];
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => {
    // Chromium cancels a media read it no longer needs (the video reloads): not a failure
    if (r.resourceType() === 'media' && r.failure()?.errorText === 'net::ERR_ABORTED') return;
    problems.push(`request failed: ${r.url()} (${r.failure()?.errorText})`);
  });
  page.on('request', (r) => {
    if (!/^(file|data|blob):/.test(r.url())) problems.push(`network request: ${r.url()}; a gallery must work offline`);
  });
  try {
    if (!fs.existsSync(file)) throw new Error(`${file} does not exist; pass the index.html of a sweep or run folder`);
    await page.goto(url, { waitUntil: 'load', timeout: 60000 });
    await page.evaluate(inPage);
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    const images = await checkImages(page);
    for (const i of images) if (!(i.width > 0)) problems.push(`<img> ${i.src}: does not decode`);
    const videos = await checkVideos(page);
    for (const v of videos) {
      if (!(v.width > 0) || v.readyState < 2) problems.push(`<video> ${v.src}: no frame decoded (${v.how}, readyState ${v.readyState})`);
    }
    const links = await checkLinks(page, url, problems);
    const title = await page.title();
    return { page: file, title, images, videos, links, problems };
  } catch (e) {
    problems.push(`could not check the page: ${e.message}`);
    return { page: file, problems };
  } finally {
    await page.close();
  }
}

// The browser as users run it: @sparticuz/chromium's flags turn web security off, which would
// let a page do from file:// what a user's browser refuses; keep it on. No host name resolves, so
// a request for the network is reported (above) and goes nowhere.
const args = [...chromium.args.filter((a) => !['--disable-web-security', '--allow-running-insecure-content'].includes(a)),
  '--host-resolver-rules=MAP * ~NOTFOUND'];
const browser = await puppeteer.launch({ executablePath: await chromium.executablePath(), headless: true, args });
const results = [];
try {
  for (const file of pages) results.push(await checkPage(browser, file));
  console.log(JSON.stringify({ browser: await browser.version(), pages: results }, null, 1));
} finally {
  await browser.close();
}
process.exit(results.every((r) => r.problems.length === 0) ? 0 : 1);
