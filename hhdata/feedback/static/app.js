// While a form waits for the server (two replies are being sampled), show it and stop a
// second submit: the server refuses duplicates anyway, this only keeps the page honest.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.sent) { event.preventDefault(); return; }
  form.dataset.sent = "1";
  const busy = form.querySelector(".busy");
  if (busy) busy.hidden = false;
});
