// Pleura key-image viewer: the full-resolution image (16-bit values from the API), windowed in the
// page, with zoom, pan, window/level presets, full screen and overlays (the model's outline, the
// heat map, the saved corrected outline), and the outline drawing tool (filled, eraser, undo).
// A canvas of our own: the node serves nothing from elsewhere, and a radiograph needs one frame,
// one window and masks, not a 3D stack (docs/worklist.md, "The viewer").
"use strict";

// Presets on the image's own range (0 = its lowest value, 1 = its highest, bright = dense): a
// radiograph has no Hounsfield scale, so "lung" spreads the dark end and "soft tissue" the bright.
const PRESETS = { lung: [0.35, 0.7], soft: [0.65, 0.45], full: [0.5, 1.0] };
const MAX_UNDO = 30;

class Viewer {
  constructor(root, { onStatus } = {}) {
    this.root = root;
    this.stage = root.querySelector("#viewer-stage");
    this.canvas = root.querySelector("#viewer-canvas");
    this.ctx = this.canvas.getContext("2d");
    this.onStatus = onStatus || (() => {});
    this.image = null;          // {rows, columns, values: Uint16Array, window: [c, w]}
    this.base = document.createElement("canvas");  // the windowed image at full size
    this.window = [0.5, 1];
    this.view = { scale: 1, x: 0, y: 0 };
    this.tool = "pan";
    this.layers = { outline: null, heatmap: null, correction: null };
    this.show = { outline: true, heatmap: false, correction: true };
    this.mask = null;           // the drawing, a canvas at full size, while drawing
    this.undo = [];
    this.stroke = null;
    this.token = 0;
    this.fitted = true;
    this._bind();
    new ResizeObserver(() => this._resize()).observe(this.stage);
  }

  // -- loading --------------------------------------------------------------------------------

  async load(image) {
    const token = ++this.token;
    this.stopDrawing();
    this.layers = { outline: null, heatmap: null, correction: null };
    const response = await fetch(image.pixels_url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`image: ${response.status} ${response.statusText}`);
    const rows = Number(response.headers.get("X-Rows"));
    const columns = Number(response.headers.get("X-Columns"));
    const values = new Uint16Array(await response.arrayBuffer());
    if (token !== this.token) return false;
    const window = [Number(response.headers.get("X-Window-Center")), Number(response.headers.get("X-Window-Width"))];
    this.image = { rows, columns, values, window };
    this.base.width = columns;
    this.base.height = rows;
    this.window = window.slice();
    this.fit();
    this.setWindow(...this.window);
    const load = (url) => new Promise((resolve) => {
      if (!url) { resolve(null); return; }
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => resolve(null);
      img.src = url;  // same origin: the session cookie goes with it
    });
    const [outline, heatmap, correction] = await Promise.all([
      load(image.outline_url), load(image.heatmap_url), load(image.correction_url)]);
    if (token !== this.token) return false;
    this.layers = { outline, heatmap, correction };
    this.render();
    return true;
  }

  async reloadCorrection(url) {
    const img = new Image();
    await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = url + "&t=" + Date.now(); });
    this.layers.correction = img.naturalWidth ? img : null;
    this.render();
  }

  // -- window, zoom, pan ----------------------------------------------------------------------

  setWindow(center, width) {
    if (!this.image) return;
    this.window = [Math.min(1.5, Math.max(-0.5, center)), Math.min(2, Math.max(0.002, width))];
    const [c, w] = this.window;
    const low = (c - w / 2) * 65535, span = w * 65535;
    const lut = new Uint8ClampedArray(65536);
    for (let v = 0; v < 65536; v++) lut[v] = ((v - low) / span) * 255;
    const { rows, columns, values } = this.image;
    const pen = this.base.getContext("2d");
    const data = pen.createImageData(columns, rows);
    const out = data.data;
    for (let i = 0, j = 0; i < values.length; i++, j += 4) {
      const g = lut[values[i]];
      out[j] = out[j + 1] = out[j + 2] = g;
      out[j + 3] = 255;
    }
    pen.putImageData(data, 0, 0);
    this.render();
  }

  preset(name) {
    if (!this.image) return;
    const [c, w] = name === "image" ? this.image.window : PRESETS[name];
    this.setWindow(c, w);
  }

  fit() {
    if (!this.image) return;
    const { width, height } = this.canvas;
    const scale = Math.min(width / this.image.columns, height / this.image.rows);
    this.view = { scale, x: (width - this.image.columns * scale) / 2, y: (height - this.image.rows * scale) / 2 };
    this.fitted = true;
    this.render();
  }

  zoom(factor, cx = this.canvas.width / 2, cy = this.canvas.height / 2) {
    const { scale, x, y } = this.view;
    const next = Math.min(40, Math.max(0.05, scale * factor));
    const k = next / scale;
    this.view = { scale: next, x: cx - (cx - x) * k, y: cy - (cy - y) * k };
    this.fitted = false;
    this.render();
  }

  fullscreen() {
    if (document.fullscreenElement) document.exitFullscreen();
    else this.root.requestFullscreen().catch(() => {});
  }

  setShow(layer, on) { this.show[layer] = on; this.render(); }

  // -- drawing --------------------------------------------------------------------------------

  startDrawing() {
    if (!this.image) return false;
    this.mask = document.createElement("canvas");
    this.mask.width = this.image.columns;
    this.mask.height = this.image.rows;
    this.undo = [];
    this.setTool("draw");
    return true;
  }

  stopDrawing() {
    this.mask = null;
    this.undo = [];
    if (this.tool === "draw" || this.tool === "erase") this.setTool("pan");
  }

  undoStroke() {
    if (!this.mask || !this.undo.length) return;
    this.mask.getContext("2d").putImageData(this.undo.pop(), 0, 0);
    this.render();
  }

  maskDataUrl() { return this.mask ? this.mask.toDataURL("image/png") : null; }

  hasDrawing() {
    if (!this.mask) return false;
    const data = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }

  setTool(tool) {
    this.tool = tool;
    this.root.querySelectorAll(".tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
    this.canvas.style.cursor = tool === "pan" ? "grab" : tool === "window" ? "ns-resize" : "crosshair";
  }

  _brush() { return Math.max(3, Math.round(Math.max(this.image.columns, this.image.rows) / 150)); }

  _commitStroke(points, erase) {
    const pen = this.mask.getContext("2d");
    this.undo.push(pen.getImageData(0, 0, this.mask.width, this.mask.height));
    if (this.undo.length > MAX_UNDO) this.undo.shift();
    pen.save();
    pen.globalCompositeOperation = erase ? "destination-out" : "source-over";
    pen.fillStyle = pen.strokeStyle = "rgb(0, 140, 255)";
    pen.lineWidth = this._brush() * (erase ? 3 : 1);
    pen.lineCap = pen.lineJoin = "round";
    pen.beginPath();
    points.forEach(([px, py], i) => (i ? pen.lineTo(px, py) : pen.moveTo(px, py)));
    if (points.length === 1) pen.lineTo(points[0][0] + 0.1, points[0][1]);
    pen.stroke();
    // A traced line is closed back to its start and filled: the label is the area inside.
    const [sx, sy] = points[0], [ex, ey] = points[points.length - 1];
    const closes = Math.hypot(ex - sx, ey - sy) < Math.max(this.image.columns, this.image.rows) / 8;
    if (!erase || closes) { pen.closePath(); pen.fill(); }
    pen.restore();
  }

  // -- rendering ------------------------------------------------------------------------------

  _resize() {
    const box = this.stage.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(box.width * ratio)), height = Math.max(1, Math.round(box.height * ratio));
    if (width === this.canvas.width && height === this.canvas.height) return;
    const [oldWidth, oldHeight] = [this.canvas.width, this.canvas.height];
    this.canvas.width = width;
    this.canvas.height = height;
    if (this.fitted || !this.image) { this.fit(); return; }
    // Zoomed in: keep the same point of the image in the middle.
    this.view = { ...this.view, x: this.view.x + (width - oldWidth) / 2, y: this.view.y + (height - oldHeight) / 2 };
    this.render();
  }

  render() {
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.image) return;
    const { scale, x, y } = this.view;
    const { columns, rows } = this.image;
    ctx.setTransform(scale, 0, 0, scale, x, y);
    ctx.imageSmoothingEnabled = scale < 1;
    ctx.drawImage(this.base, 0, 0);
    ctx.imageSmoothingEnabled = true;
    if (this.show.heatmap && this.layers.heatmap) {
      ctx.globalAlpha = 0.5;
      ctx.drawImage(this.layers.heatmap, 0, 0, columns, rows);
      ctx.globalAlpha = 1;
    }
    if (this.show.outline && this.layers.outline) ctx.drawImage(this.layers.outline, 0, 0, columns, rows);
    if (this.show.correction && this.layers.correction && !this.mask) ctx.drawImage(this.layers.correction, 0, 0, columns, rows);
    if (this.mask) {
      ctx.globalAlpha = 0.5;
      ctx.drawImage(this.mask, 0, 0);
      ctx.globalAlpha = 1;
    }
    if (this.stroke && this.stroke.points.length > 1) {
      ctx.strokeStyle = this.stroke.erase ? "rgba(255, 255, 0, 0.9)" : "rgba(0, 170, 255, 0.9)";
      ctx.lineWidth = this._brush() * (this.stroke.erase ? 3 : 1);
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      this.stroke.points.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
      ctx.stroke();
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    const [c, w] = this.window;
    this.onStatus(`${columns} × ${rows} · zoom ${Math.round(scale * 100)} % · window ${(w * 100).toFixed(0)} % at ${(c * 100).toFixed(0)} %`);
  }

  // -- input ----------------------------------------------------------------------------------

  _imagePoint(event) {
    const box = this.canvas.getBoundingClientRect();
    const ratio = this.canvas.width / box.width;
    const cx = (event.clientX - box.left) * ratio, cy = (event.clientY - box.top) * ratio;
    return [(cx - this.view.x) / this.view.scale, (cy - this.view.y) / this.view.scale, cx, cy];
  }

  _bind() {
    const canvas = this.canvas;
    let drag = null;
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      const [, , cx, cy] = this._imagePoint(event);
      this.zoom(Math.pow(1.0015, -event.deltaY), cx, cy);
    }, { passive: false });
    canvas.addEventListener("dblclick", () => this.fit());
    canvas.addEventListener("pointerdown", (event) => {
      if (!this.image) return;
      canvas.setPointerCapture(event.pointerId);
      const [ix, iy, cx, cy] = this._imagePoint(event);
      const tool = event.button === 2 ? "window" : this.tool;
      drag = { tool, cx, cy, view: { ...this.view }, window: this.window.slice() };
      if ((tool === "draw" || tool === "erase") && this.mask) this.stroke = { points: [[ix, iy]], erase: tool === "erase" };
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const [ix, iy, cx, cy] = this._imagePoint(event);
      const dx = cx - drag.cx, dy = cy - drag.cy;
      if (drag.tool === "pan") {
        this.view = { ...drag.view, x: drag.view.x + dx, y: drag.view.y + dy };
        this.fitted = false;
        this.render();
      } else if (drag.tool === "window") {
        const h = canvas.height || 1;
        this.setWindow(drag.window[0] - dy / h, drag.window[1] * Math.exp(dx / h));
      } else if (this.stroke) {
        this.stroke.points.push([ix, iy]);
        this.render();
      }
    });
    const end = () => {
      if (this.stroke && this.mask) this._commitStroke(this.stroke.points, this.stroke.erase);
      this.stroke = null;
      drag = null;
      this.render();
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
  }
}

window.PleuraViewer = Viewer;
