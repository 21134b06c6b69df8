// The chat page of gemma3-serve: plain JavaScript, no build step, no dependencies. It speaks the server's own
// OpenAI routes: GET v1/models once, then POST v1/chat/completions with stream: true for every turn.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];

const history = []; // the conversation as OpenAI messages: the whole of it is sent with every turn
let modelId = null; // null until v1/models answers: requests then leave `model` out (the server's own)
let controller = null; // aborts the answer being streamed; the server cancels its job on the disconnect

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

// OpenAI's error object, {"error": {"message", "param", ...}}, as one line for the user.
function errorText(status, body) {
  const e = body && body.error;
  const head = status ? `Error ${status}` : "Error";
  return e ? `${head}: ${e.message}${e.param ? ` (${e.param})` : ""}` : head;
}

async function responseError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status alone
  }
  return errorText(response.status, body);
}

async function loadModel() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (e) {
    showError(`The server cannot be reached: ${e.message}`);
    return;
  }
  if (response.status === 401) { // the server has a key: ask for it (and say so if the one given is wrong)
    $("key-row").hidden = false;
    $("model").textContent = "this server needs an API key (Settings)";
    showError($("api-key").value.trim() ? await responseError(response) : "");
    return;
  }
  if (!response.ok) {
    showError(await responseError(response));
    return;
  }
  const model = (await response.json()).data[0];
  modelId = model.id;
  $("model").textContent = `model: ${model.id}`;
  $("image-controls").hidden = !model.sees_images; // uploads only where the model can see them
  showError("");
}

// The settings that are filled in; empty ones are left to the model's generation defaults.
function samplingFields() {
  const fields = {};
  for (const name of NUMBERS) {
    const value = $(name).value.trim();
    if (value !== "") fields[name] = Number(value);
  }
  if (!$("image-controls").hidden && $("pan-and-scan").checked) fields.pan_and_scan = true;
  return fields;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function addMessage(role, text, imageUrl) {
  const item = document.createElement("article");
  item.className = `message ${role}`;
  const who = document.createElement("h3");
  who.textContent = role === "user" ? "You" : "Model";
  item.append(who);
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "uploaded image";
    item.append(img);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text; // text, never HTML: an answer cannot inject markup
  item.append(body);
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return body;
}

// The server-sent events of a streamed answer, one parsed JSON object per `data:` line, until [DONE].
// Yields arrays: every event that one network read delivered, so the page redraws once per read.
async function* sseBatches(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop(); // an event cut in two by the network waits for its end
    const batch = [];
    for (const block of blocks) {
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          yield batch;
          return;
        }
        batch.push(JSON.parse(data));
      }
    }
    if (batch.length) yield batch;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
  $("log").setAttribute("aria-busy", String(busy)); // screen readers read the answer once it is whole
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  showError("");
  const file = $("image-controls").hidden ? null : $("image").files[0];
  let imageUrl = null;
  try {
    imageUrl = file ? await readAsDataURL(file) : null;
  } catch (e) {
    showError(`The image cannot be read: ${e.message}`);
    return;
  }
  const user = {
    role: "user",
    content: imageUrl ? [{ type: "image_url", image_url: { url: imageUrl } }, { type: "text", text }] : text,
  };
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, user];
  const body = { messages, stream: true, ...samplingFields() };
  if (modelId) body.model = modelId;

  $("prompt").value = "";
  $("image").value = "";
  const userText = addMessage("user", text, imageUrl);
  const answer = addMessage("assistant", "");
  answer.parentElement.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await responseError(response));
    for await (const batch of sseBatches(response.body)) {
      for (const chunk of batch) {
        if (chunk.error) throw new Error(errorText(null, chunk)); // an error after the stream began
        const choice = chunk.choices[0];
        if (choice) {
          reply += choice.delta.content || "";
          finish = choice.finish_reason || finish;
        }
      }
      answer.textContent = reply;
      answer.scrollIntoView({ block: "end" });
    }
    history.push(user, { role: "assistant", content: reply });
    if (finish === "length") answer.parentElement.dataset.note = "(max tokens reached)";
  } catch (e) {
    if (e.name === "AbortError") { // stopped: the partial answer stays in the conversation
      history.push(user, { role: "assistant", content: reply });
      answer.parentElement.dataset.note = "(stopped)";
    } else { // nothing of this turn is kept: the message goes back to the box to edit or resend
      userText.parentElement.remove();
      answer.parentElement.remove();
      $("prompt").value = text;
      showError(e.message);
    }
  } finally {
    answer.parentElement.classList.remove("streaming");
    controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

function newChat() {
  history.length = 0;
  $("log").replaceChildren();
  showError("");
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("api-key").addEventListener("change", loadModel);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("chat").requestSubmit(); // checks the settings' number fields first
    }
  });
  loadModel();
});
