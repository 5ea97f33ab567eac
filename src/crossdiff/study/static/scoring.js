// Keyboard scoring: 1-5 score the highlighted question and move on to the next one, arrows change the
// question, Enter or N saves and goes to the next image, P goes back, W switches the display window,
// C goes to the comment and Esc leaves it. Without JavaScript the form still works with the mouse.
(function () {
  "use strict";
  const form = document.getElementById("scores");
  if (!form) {
    return;
  }
  const questions = Array.from(form.querySelectorAll("fieldset.question"));
  const windows = Array.from(document.querySelectorAll("button.window"));
  const images = Array.from(document.querySelectorAll(".viewer img"));
  let active = 0;

  function highlight(index) {
    active = Math.max(0, Math.min(questions.length - 1, index));
    questions.forEach((q, i) => q.classList.toggle("active", i === active));
  }

  function show(name) {
    windows.forEach((b) => b.classList.toggle("active", b.dataset.window === name));
    images.forEach((img) => { img.hidden = img.dataset.window !== name; });
  }

  function score(value) {
    const radio = questions[active].querySelector(`input[value="${value}"]`);
    radio.checked = true;
    highlight(active + 1);
  }

  questions.forEach((q, i) => q.addEventListener("change", () => highlight(i + 1)));
  questions.forEach((q, i) => q.addEventListener("click", () => highlight(i)));
  windows.forEach((b) => b.addEventListener("click", () => show(b.dataset.window)));

  document.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLTextAreaElement || event.target instanceof HTMLInputElement && event.target.type === "text";
    if (typing) {
      if (event.key === "Escape") {
        event.target.blur();
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    const key = event.key.toLowerCase();
    if (key === "enter" && (event.target instanceof HTMLAnchorElement || event.target instanceof HTMLButtonElement)) {
      return;  // Enter on a link or button does what that link or button does
    }
    if (key >= "1" && key <= "5") {
      score(key);
    } else if (key === "arrowdown") {
      highlight(active + 1);
    } else if (key === "arrowup") {
      highlight(active - 1);
    } else if (key === "enter" || key === "n") {
      form.requestSubmit();
    } else if (key === "p") {
      const previous = document.getElementById("previous");
      if (previous) {
        window.location.href = previous.href;
      }
    } else if (key === "w" && windows.length > 1) {
      const current = windows.findIndex((b) => b.classList.contains("active"));
      show(windows[(current + 1) % windows.length].dataset.window);
    } else if (key === "c") {
      document.getElementById("comment").focus();
    } else {
      return;
    }
    event.preventDefault();
  });
})();
