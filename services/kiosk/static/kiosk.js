// The kiosk page: camera frame -> kiosk gateway (REST) -> the MFA's decision. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
// The kiosk launcher opens the page with its key in the fragment (never sent to a server); it is
// kept in memory only and removed from the address bar at once.
const key = new URLSearchParams(location.hash.slice(1)).get("key") || "";
history.replaceState(null, "", location.pathname);
let sessionId = "";

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text || "";
}

async function api(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "Authorization": "Bearer " + key, "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
  const data = await r.json();
  if (!r.ok) throw new Error(`${data.reason}: ${data.message}`);
  return data;
}

function showDecision(d) {
  $("outcome").textContent = { ALLOW: "Welcome", DENY: "Not allowed", REVIEW: "Please see a member of staff",
                               STEP_UP: "More is needed" }[d.outcome] || d.outcome;
  $("outcome").dataset.outcome = d.outcome;
  const list = $("reasons");
  list.replaceChildren();
  for (const r of d.reasons) {  // the decision's reasons include the failed factors' own
    const li = document.createElement("li");
    li.dataset.code = r.code;
    li.textContent = `${r.code}: ${r.message}`;
    list.append(li);
  }
}

function frame() {
  const video = $("camera");
  if (video.readyState < 2 || !video.videoWidth) throw new Error("the camera has no picture yet");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return canvas.toDataURL("image/jpeg", 0.95).split(",", 2)[1];
}

async function decide() {
  const d = await api(`/v1/sessions/${sessionId}/decision`);
  const needSms = d.outcome === "STEP_UP" && d.still_needed.some((s) => s.includes("sms_otp"));
  if (needSms && !$("otp-form").hidden) {
    showDecision(d);
    setState("otp", "The code was not accepted: try again.");
    return;
  }
  if (needSms) {
    const sent = await api(`/v1/sessions/${sessionId}/otp/send`);
    $("otp-prompt").textContent = `We sent a code to ${sent.masked_phone}.`;
    $("otp-form").hidden = false;
    showDecision(d);
    setState("otp", "Enter the SMS code.");
    return;
  }
  showDecision(d);
  $("otp-form").hidden = true;
  setState("done");
}

$("start-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    setState("working", "Looking at the camera...");
    const image = frame();
    sessionId = (await api("/v1/sessions", { customer: $("customer").value.trim() })).session_id;
    await api(`/v1/sessions/${sessionId}/face`, { image_b64: image });
    await decide();
  } catch (err) {
    setState("error", err.message);
  }
});

$("otp-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    setState("working", "Checking the code...");
    await api(`/v1/sessions/${sessionId}/otp`, { code: $("otp-code").value.trim() });
    await decide();
  } catch (err) {
    setState("error", err.message);
  }
});

(async () => {
  if (!key) {
    setState("error", "This kiosk was started without its key.");
    return;
  }
  try {
    $("camera").srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
    await $("camera").play();
    setState("ready", "Look at the camera and enter your customer number.");
  } catch (err) {
    setState("error", "No camera: " + err.message);
  }
})();
