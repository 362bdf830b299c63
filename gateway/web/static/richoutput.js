// @ts-check
/**
 * Rich output of Python execs (display bundles: docs/protocol.md) as page elements, for the IDE's
 * output panel. A bundle is untrusted (the sandbox's code made it): nothing of it is ever parsed
 * into this page's DOM. HTML goes into an iframe with an empty `sandbox` attribute (no scripts, a
 * unique origin, no forms or navigation) and SVG into an <img> (which runs no scripts); images
 * are data: URLs of the bundle's base64, which the gateway checked is base64.
 */

/** The MIME types shown, richest first (as Jupyter picks one representation per bundle). */
export const SHOWN = ["text/html", "image/svg+xml", "image/png", "image/jpeg", "application/json",
  "text/markdown", "text/latex", "text/plain"];

/**
 * Which representation of `bundle` to show.
 * @param {Record<string, string>} bundle
 * @returns {string}
 */
export function choose(bundle) {
  return SHOWN.find((mime) => typeof bundle[mime] === "string") ?? "text/plain";
}

/**
 * `text` (a JSON document) indented, or as it is when it does not parse.
 * @param {string} text
 */
export function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/** @param {string} text */
function utf8Base64(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

/**
 * One bundle as an element of `doc`: a <figure> holding the chosen representation.
 * @param {Record<string, string>} bundle
 * @param {Document} doc
 * @returns {HTMLElement}
 */
export function renderBundle(bundle, doc) {
  const mime = choose(bundle);
  const value = bundle[mime] ?? "";
  const figure = doc.createElement("figure");
  figure.className = "display";
  figure.dataset.mime = mime;
  /** @type {HTMLElement} */
  let body;
  if (mime === "text/html") {
    const frame = doc.createElement("iframe");
    frame.setAttribute("sandbox", ""); // before srcdoc: the document never exists unsandboxed
    frame.setAttribute("referrerpolicy", "no-referrer");
    frame.title = "HTML output of the sandbox";
    frame.srcdoc = value;
    body = frame;
  } else if (mime.startsWith("image/")) {
    const img = doc.createElement("img");
    const data = mime === "image/svg+xml" ? utf8Base64(value) : value;
    img.src = `data:${mime};base64,${data}`;
    img.alt = bundle["text/plain"] ?? mime;
    body = img;
  } else {
    const pre = doc.createElement("pre");
    pre.textContent = mime === "application/json" ? prettyJson(value) : value;
    body = pre;
  }
  figure.append(body);
  return figure;
}
