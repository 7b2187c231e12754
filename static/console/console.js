// "Select all" checkboxes: a header box with data-select-all="name" ticks every box of that name.
document.addEventListener("change", (event) => {
  const all = event.target.closest("[data-select-all]");
  if (!all) return;
  for (const box of document.querySelectorAll(`input[name="${all.dataset.selectAll}"]`)) {
    box.checked = all.checked;
  }
});

// Forms marked data-submit-once post once: a double click does not send a second request.
document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-submit-once]");
  if (!form) return;
  if (form.dataset.sent) {
    event.preventDefault();
    return;
  }
  form.dataset.sent = "1";
  setTimeout(() => form.querySelectorAll("button").forEach((b) => { b.disabled = true; }), 0);
});

// Buttons marked data-confirm="question" submit only once the question is answered OK
// (no inline onclick: the Content-Security-Policy refuses inline script).
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-confirm]");
  if (button && !window.confirm(button.dataset.confirm)) event.preventDefault();
});

// A button marked data-needs-selection="name" is enabled only while a box of that name is
// ticked (an empty selection cannot be submitted); its data-confirm may say {count}.
function syncSelectionButtons() {
  for (const button of document.querySelectorAll("[data-needs-selection]")) {
    const name = button.dataset.needsSelection;
    const count = document.querySelectorAll(`input[name="${name}"]:checked`).length;
    button.disabled = count === 0;
    if (button.dataset.confirm !== undefined && button.dataset.confirmTemplate === undefined) {
      button.dataset.confirmTemplate = button.dataset.confirm;
    }
    if (button.dataset.confirmTemplate !== undefined) {
      button.dataset.confirm = button.dataset.confirmTemplate.replace("{count}", count);
    }
    button.textContent = count ? `${button.dataset.label || "Replay selected"} (${count})`
                               : (button.dataset.label || "Replay selected");
  }
}
document.addEventListener("change", syncSelectionButtons);
document.addEventListener("DOMContentLoaded", syncSelectionButtons);
document.addEventListener("htmx:afterSettle", syncSelectionButtons);

// A request htmx sent failed (a server error, a lost connection): say so where messages
// appear, instead of leaving the button as if nothing happened.
function showError(text) {
  const list = document.getElementById("messages");
  if (!list) return;
  const item = document.createElement("li");
  item.className = "msg-error";
  item.textContent = text;
  list.replaceChildren(item);
}
document.addEventListener("htmx:responseError", (event) => {
  const status = event.detail.xhr.status;
  showError(status === 403 ? "Not allowed: your role cannot do this."
    : `The server could not do this (HTTP ${status}). Nothing was shown as done; try again or reload the page.`);
});
document.addEventListener("htmx:sendError", () => {
  showError("The server could not be reached. Check your connection and try again.");
});

// A search box filters as one types (its own trigger); the "change" it also fires when it
// loses focus would send the same filter again, and could redraw the list over a replay
// clicked in the meantime. Stopped here, in the capture phase, before htmx sees it.
document.addEventListener("change", (event) => {
  if (event.target.matches?.('form.filters input[type="search"]')) event.stopPropagation();
}, true);
