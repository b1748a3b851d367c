// While a form waits for the server (two replies are being sampled), show it and stop a
// second submit: the server refuses duplicates anyway, this only keeps the page honest.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.sent) { event.preventDefault(); return; }
  form.dataset.sent = "1";
  const busy = form.querySelector(".busy");
  if (busy) busy.hidden = false;
});

// Cancel: ask the server to stop sampling; the pending send then returns to the same page
// with nothing stored, and the message box comes back.
document.addEventListener("click", (event) => {
  const button = event.target.closest("#cancel");
  if (!button) return;
  const form = button.closest("form");
  const body = new URLSearchParams({ csrf: form.querySelector("[name=csrf]").value });
  button.disabled = true;
  fetch(button.dataset.url, { method: "POST", body, credentials: "same-origin" });
});
