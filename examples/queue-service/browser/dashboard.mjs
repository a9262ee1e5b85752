// Opens the demo dashboard in a real headless Chromium, reads what a person would
// see, and saves a screenshot. Prints one JSON line; exits non-zero on any failure.
//
//   node dashboard.mjs <base-url> <header-name> <header-value> <screenshot.png>
//
// The credential goes in a request header (the dashboard never takes it from the
// URL). Without the header the same page must be refused.
import { chromium } from "playwright-core";

const [base, headerName, headerValue, screenshot] = process.argv.slice(2);
if (!base || !headerName || !headerValue || !screenshot) {
  console.error("usage: node dashboard.mjs <base-url> <header-name> <header-value> <screenshot.png>");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  // Without a credential: refused, and no figures on the page.
  const anonymous = await browser.newPage();
  const refused = await anonymous.goto(`${base}/dashboard`);
  const refusedText = await anonymous.textContent("body");

  // With the credential in a header.
  const context = await browser.newContext({ extraHTTPHeaders: { [headerName]: headerValue } });
  const page = await context.newPage();
  const res = await page.goto(`${base}/dashboard`);
  const cells = await page.$$eval("td[id]", (tds) =>
    Object.fromEntries(tds.map((td) => [td.id, td.textContent])),
  );
  const heading = await page.textContent("h1");
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(
    JSON.stringify({
      refused_status: refused.status(),
      refused_has_figures: refusedText.includes("queue_depth"),
      status: res.status(),
      title: await page.title(),
      heading,
      cells,
      csp: res.headers()["content-security-policy"] || null,
    }),
  );
} finally {
  await browser.close();
}
