// The case page: the case pyramid in OpenSeadragon, the heatmap pyramid over it, the regions as an SVG overlay,
// and the gallery of the patches that drove the call. window.review holds what the browser test reads.
(function () {
  "use strict";
  const el = document.getElementById("osd");
  if (!el || !Number(el.dataset.width)) return;
  const id = el.dataset.case, width = Number(el.dataset.width), height = Number(el.dataset.height);
  // the top patches are in case.ome.tif's pixels, the regions in their file's units: both to the view's pixels
  const scale = Number(el.dataset.scale || 1), regionsScale = Number(el.dataset.regionsScale || 1);
  const base = "/viewer/cases/" + encodeURIComponent(id);
  const review = (window.review = {tilesLoaded: 0, maxLevelLoaded: -1, heatmap: null, regions: null});
  const viewer = OpenSeadragon({
    id: "osd", prefixUrl: "/viewer/osd/images/", tileSources: base + "/slide.dzi",
    showNavigator: true, maxZoomPixelRatio: 4, drawer: "canvas", crossOriginPolicy: false, loadTilesWithAjax: false,
  });
  review.viewer = viewer;

  viewer.addHandler("tile-loaded", function (e) {
    if (e.tiledImage !== viewer.world.getItemAt(0)) return;
    review.tilesLoaded += 1;
    if (review.firstTileMs === undefined) review.firstTileMs = performance.now();  // since the page was asked for
    review.maxLevelLoaded = Math.max(review.maxLevelLoaded, e.tile.level);
    const img = e.data || e.image;  // the tile as drawn: its pixels and the image pixels it covers
    review.lastTile = {level: e.tile.level, width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0,
                       sourceWidth: e.tile.sourceBounds.width, sourceHeight: e.tile.sourceBounds.height};
  });
  const mpp = Number(el.dataset.mpp || 0);  // microns per image pixel at full resolution, when the file says
  review.mpp = mpp;
  viewer.addHandler("zoom", function () {
    const z = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
    document.getElementById("zoom-level").textContent = "image zoom " + z.toFixed(2) + "x" +
      (mpp ? ", " + (mpp / z).toPrecision(3) + " µm per screen pixel" : "");
  });

  viewer.addOnceHandler("open", function () {
    if (el.dataset.heatmap) {
      viewer.addTiledImage({
        tileSource: base + "/heatmap.dzi", x: 0, y: 0, width: 1, opacity: 0.45,
        success: function (e) { review.heatmap = e.item; },
      });
    }
    if (el.dataset.regions) {
      fetch("/cases/" + encodeURIComponent(id) + "/regions.geojson", {credentials: "same-origin"})
        .then(function (r) { return r.json(); })
        .then(drawRegions);
    }
  });

  function drawRegions(geojson) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "regions");
    let count = 0;
    (geojson.features || []).forEach(function (f) {
      const g = f.geometry || {};
      const polygons = g.type === "Polygon" ? [g.coordinates] : g.type === "MultiPolygon" ? g.coordinates : [];
      polygons.forEach(function (rings) {
        const path = document.createElementNS(ns, "path");
        path.setAttribute("d", rings.map(function (ring) {
          return "M" + ring.map(function (p) { return p[0] * regionsScale + " " + p[1] * regionsScale; }).join("L") + "Z";
        }).join(""));
        path.setAttribute("fill-rule", "evenodd");
        svg.appendChild(path);
        count += 1;
      });
    });
    const holder = document.createElement("div");
    holder.className = "regions-holder";
    holder.appendChild(svg);
    viewer.addOverlay({element: holder, location: new OpenSeadragon.Rect(0, 0, 1, height / width)});
    review.regions = {element: holder, polygons: count};
  }

  function setHeatmap() {
    if (!review.heatmap) return;
    const on = document.getElementById("heatmap-on").checked;
    review.heatmap.setOpacity(on ? Number(document.getElementById("heatmap-opacity").value) / 100 : 0);
  }
  const heatOn = document.getElementById("heatmap-on");
  if (heatOn) {
    heatOn.addEventListener("change", setHeatmap);
    document.getElementById("heatmap-opacity").addEventListener("input", setHeatmap);
  }
  const regionsOn = document.getElementById("regions-on");
  if (regionsOn) {
    regionsOn.addEventListener("change", function () {
      if (review.regions) review.regions.element.style.display = regionsOn.checked ? "" : "none";
    });
  }
  // class-activation maps: each top patch's map (its members' mean logit per position), scaled from its own
  // lowest to its highest position (where in the patch the score came from, as CAMs are read) and drawn in
  // red, over the gallery's patch and, as an optional layer, over the case
  function paintCam(canvas, cam) {
    const rows = cam.length, cols = cam[0].length, small = document.createElement("canvas");
    const flat = [].concat.apply([], cam), lo = Math.min.apply(null, flat), hi = Math.max.apply(null, flat);
    small.width = cols; small.height = rows;
    const ctx = small.getContext("2d"), img = ctx.createImageData(cols, rows);
    cam.forEach(function (row, y) {
      row.forEach(function (v, x) {
        const p = hi > lo ? (v - lo) / (hi - lo) : 0.5, i = 4 * (y * cols + x);
        img.data[i] = 255; img.data[i + 1] = 40; img.data[i + 2] = 40; img.data[i + 3] = Math.round(200 * p);
      });
    });
    ctx.putImageData(img, 0, 0);
    const out = canvas.getContext("2d");
    out.imageSmoothingEnabled = true;
    out.clearRect(0, 0, canvas.width, canvas.height);
    out.drawImage(small, 0, 0, canvas.width, canvas.height);
  }
  review.cams = [];
  document.querySelectorAll("#gallery .patch").forEach(function (b) {
    if (!b.dataset.cam) return;
    const cam = JSON.parse(b.dataset.cam);
    paintCam(b.querySelector("canvas.cam"), cam);
    const layer = document.createElement("canvas");
    layer.width = 50; layer.height = 50; layer.className = "cam-layer";
    paintCam(layer, cam);
    const x = scale * b.dataset.x, y = scale * b.dataset.y, w = scale * b.dataset.w, h = scale * b.dataset.h;
    viewer.addOnceHandler("open", function () {  // image coordinates need the opened case pyramid
      viewer.addOverlay({element: layer, location: viewer.viewport.imageToViewportRectangle(x, y, w, h)});
    });
    review.cams.push(layer);
  });
  // (OpenSeadragon sets its overlays' own display: the layer is shown and hidden by a class on the viewer)
  el.classList.add("cams-hidden");
  const camOn = document.getElementById("cam-on");
  if (camOn) {
    camOn.addEventListener("change", function () { el.classList.toggle("cams-hidden", !camOn.checked); });
  }
  document.querySelectorAll("#gallery .patch").forEach(function (b) {
    b.addEventListener("click", function () {
      const x = scale * b.dataset.x, y = scale * b.dataset.y, w = scale * b.dataset.w, h = scale * b.dataset.h;
      viewer.viewport.fitBounds(viewer.viewport.imageToViewportRectangle(x - w, y - h, 3 * w, 3 * h));
    });
  });
})();
