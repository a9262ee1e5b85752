// Signs in to the demo dashboard through its login form in a real headless
// Chromium, reads the figures, signs out, and checks that the dashboard is refused
// afterwards. Saves a screenshot of the signed-in dashboard. Prints one JSON line;
// exits non-zero on any failure.
//
//   node dashboard_login.mjs <base-url> <admin-key> <screenshot.png>
import { chromium } from "playwright-core";

const [base, key, screenshot] = process.argv.slice(2);
if (!base || !key || !screenshot) {
  console.error("usage: node dashboard_login.mjs <base-url> <admin-key> <screenshot.png>");
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
  const context = await browser.newContext();
  const page = await context.newPage();
  const before = await page.goto(`${base}/dashboard`);

  // Sign in through the form, as a person would.
  await page.goto(`${base}/dashboard/login`);
  await page.fill('input[name="key"]', key);
  const [dashboard] = await Promise.all([
    page.waitForResponse((r) => new URL(r.url()).pathname === "/dashboard"),
    page.click('button[type="submit"]'),
  ]);
  await page.waitForSelector("h1");
  const cells = await page.$$eval("td[id]", (tds) =>
    Object.fromEntries(tds.map((td) => [td.id, td.textContent])),
  );
  const heading = await page.textContent("h1");
  await page.screenshot({ path: screenshot, fullPage: true });
  const session = (await context.cookies()).find((c) => c.name === "pc_dashboard");
  const scriptSeesCookie = await page.evaluate(() => document.cookie.includes("pc_dashboard"));
  // The API with this browser's cookies: not granted.
  const api = await context.request.get(`${base}/v1/admin/stats`);

  // Sign out, then the dashboard is refused.
  await Promise.all([page.waitForURL(`${base}/dashboard/login`), page.click('button[type="submit"]')]);
  const cookiesAfter = (await context.cookies()).filter((c) => c.name === "pc_dashboard").length;
  const after = await page.goto(`${base}/dashboard`);
  const afterText = await page.textContent("body");
  console.log(
    JSON.stringify({
      before_status: before.status(),
      login_status: dashboard.status(),
      url: page.url(),
      heading,
      cells,
      cookie: session
        ? { httpOnly: session.httpOnly, sameSite: session.sameSite, path: session.path, secure: session.secure, expires: session.expires }
        : null,
      script_sees_cookie: scriptSeesCookie,
      api_status: api.status(),
      cookies_after_logout: cookiesAfter,
      after_status: after.status(),
      after_has_figures: afterText.includes("queue_depth"),
    }),
  );
} finally {
  await browser.close();
}
