// faceindex serve: the only script. Without it every page still works; it adds dropping a photo on the
// search form (the file input then submits it).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const drop = document.getElementById("drop");
  if (!drop) return;
  const input = drop.querySelector("input[type=file]");
  const form = document.getElementById("search-form");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      form.requestSubmit();
    }
  });
});
