import ArgumentParser
import Foundation
import NameBasedSockets
import NIOConcurrencyHelpers

/// How `serve`, `connect` and `cat` show their sessions while they run.
enum ViewMode: String, ExpressibleByArgument, CaseIterable, Sendable {
    /// `live` on a terminal, `lines` otherwise.
    case auto
    /// A table redrawn in place a few times a second, events scrolling above it.
    case live
    /// Plain lines: each event as it happens and one status line per session per second.
    case lines
    case off

    func resolved(isTerminal: Bool) -> ViewMode {
        self == .auto ? (isTerminal ? .live : .lines) : self
    }
}

/// What the view shows of a subflow's state. `stalled` means suspended from scheduling while TCP
/// is given the chance to recover (we watch whether ACKs return), hence "probing".
func displayState(_ state: SubflowState) -> String {
    switch state {
    case .connecting: "joining"
    case .active: "active"
    case .backup: "backup"
    case .standby: "standby"
    case .draining: "draining"
    case .stalled: "probing"
    case .closed: "retired"
    }
}

/// Pure rendering: snapshots in, lines out. No terminal control codes here.
enum LiveViewRenderer {
    static let columns = "  #  local -> remote                          iface     state      rtt ms  send Mb/s  recv Mb/s       sent       recv"

    static func sessionLines(_ session: SessionStatus, showRetired: (SubflowStatus) -> Bool = { _ in true }, barWidth: Int = 24) -> [String] {
        let arrow = session.role == "server" ? "<-" : "->"
        var title = "\(session.localName) \(arrow) \(session.peerName):\(session.port)  [\(session.peerVerification)]  \(session.role)  "
            + String(format: "%.1f s", session.elapsedS)
        if let finished = session.finished { title += "  \(finished)" }
        var totals = ""
        if let expected = session.expectedBytes, expected > 0 {
            totals = progressBar(done: session.bytesDone, of: expected, width: barWidth) + "  "
        } else {
            totals = "\(byteCount(session.bytesDone)) \(session.progress)  "
        }
        totals += String(format: "send %.2f Mbit/s  recv %.2f Mbit/s", session.sendMbps, session.recvMbps)
        if session.reinjectedBytes > 0 { totals += "  reinjected \(byteCount(session.reinjectedBytes))" }
        return [title, totals, columns] + session.subflows.filter { $0.state != SubflowState.closed.rawValue || showRetired($0) }.map(subflowLine)
    }

    static func subflowLine(_ s: SubflowStatus) -> String {
        let rtt = s.rttMs.map { String(format: "%.1f", $0) } ?? "-"
        return pad("\(s.id)", 3, right: true) + "  " + pad("\(s.local) -> \(s.remote)", 40) + " " + pad(s.interface ?? "-", 9) + " " + pad(s.view, 8)
            + " " + pad(rtt, 8, right: true) + " " + pad(String(format: "%.2f", s.sendMbps), 10, right: true)
            + " " + pad(String(format: "%.2f", s.recvMbps), 10, right: true)
            + " " + pad(byteCount(s.bytesSent), 10, right: true) + " " + pad(byteCount(s.bytesReceived), 10, right: true)
    }

    /// `[#########...............]  12.0 MiB/32.0 MiB  37%`
    static func progressBar(done: Int, of total: Int, width: Int) -> String {
        let fraction = min(1, max(0, Double(done) / Double(total)))
        let filled = Int((fraction * Double(width)).rounded(.down))
        return "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "]  "
            + "\(mib(done))/\(mib(total))  \(Int((fraction * 100).rounded(.down)))%"
    }

    /// One line per session per second when stdout is not a terminal.
    static func statusLine(_ session: SessionStatus) -> String {
        var line = String(format: "[%7.2fs] ", session.elapsedS) + "\(session.localName) \(session.role == "server" ? "<-" : "->") \(session.peerName)"
        if let expected = session.expectedBytes, expected > 0 {
            line += " \(mib(session.bytesDone))/\(mib(expected))"
        } else {
            line += " \(byteCount(session.bytesDone))"
        }
        line += String(format: " send %.2f recv %.2f Mbit/s |", session.sendMbps, session.recvMbps)
        for s in session.subflows where s.state != SubflowState.closed.rawValue {
            line += " \(s.id):\(s.local)->\(s.remote) \(s.view)" + String(format: " %.2f/%.2f", s.sendMbps, s.recvMbps)
        }
        return line
    }

    static func eventLine(_ t: Double, _ event: SessionEvent, session: Int? = nil) -> String {
        String(format: "[%7.2fs] ", t) + (session.map { "session \($0): " } ?? "") + describe(event)
    }

    static func mib(_ bytes: Int) -> String { String(format: "%.1f MiB", Double(bytes) / 1_048_576) }

    static func byteCount(_ bytes: Int) -> String {
        switch bytes {
        case ..<1024: "\(bytes) B"
        case ..<(1 << 20): String(format: "%.1f KiB", Double(bytes) / 1024)
        case ..<(1 << 30): String(format: "%.1f MiB", Double(bytes) / 1_048_576)
        default: String(format: "%.2f GiB", Double(bytes) / 1_073_741_824)
        }
    }

    static func pad(_ text: String, _ width: Int, right: Bool = false) -> String {
        guard text.count < width else { return text }
        let fill = String(repeating: " ", count: width - text.count)
        return right ? fill + text : text + fill
    }

    /// Lines wider than the terminal would wrap and break the cursor arithmetic of the redraw.
    static func fit(_ line: String, width: Int) -> String {
        line.count <= width ? line : String(line.prefix(max(1, width - 1))) + "…"
    }
}

/// Draws the registry's sessions on stdout until stopped. On a terminal the table is redrawn in
/// place (one write per frame, so it does not flicker) with events printed above it; otherwise
/// events and once-a-second status lines are printed as plain lines.
final class LiveView: Sendable {
    let mode: ViewMode
    /// stdout, or stderr for `cat`, whose stdout carries the session's bytes.
    let output: Int32
    private let registry: SessionRegistry
    private let state = NIOLockedValueBox(State())

    private struct State {
        var drawnHeight = 0
        var eventCursor: [Int: Int] = [:]
        var retiredAt: [String: ContinuousClock.Instant] = [:]
        var lastStatusLine: ContinuousClock.Instant?
        var pendingLines: [String] = []
        var cursorHidden = false
    }

    /// Retired subflows stay on screen this long, so a failure can be seen, then make room.
    static let retiredVisibility: Duration = .seconds(10)

    init(mode: ViewMode, registry: SessionRegistry, output: Int32 = STDOUT_FILENO) {
        self.mode = mode
        self.output = output
        self.registry = registry
    }

    /// Prints lines that stay (a session's final report, a log line) above the live table, at the
    /// next frame: callers may be on an event loop, which must not wait for a terminal.
    func printPermanent(_ text: String) {
        guard mode == .live else {
            Terminal.write(text + "\n", to: output)
            return
        }
        state.withLockedValue { $0.pendingLines.append(contentsOf: text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)) }
    }

    /// The final frame, leaving the cursor visible below it.
    func finish() {
        guard mode != .off else { return }
        draw(final: true)
    }

    func draw(final: Bool = false) {
        guard mode != .off else { return }
        let now = ContinuousClock.now
        let sessions = registry.sessions
        let size = Terminal.size(output)
        var output = ""
        state.withLockedValue { s in
            var permanent = s.pendingLines
            s.pendingLines.removeAll()
            for tracked in sessions {
                let (events, next) = tracked.events(from: s.eventCursor[tracked.id] ?? 0)
                s.eventCursor[tracked.id] = next
                let tag = sessions.count > 1 || registry.command == "serve" ? tracked.id : nil
                permanent += events.map { LiveViewRenderer.eventLine($0.t, $0.event, session: tag) }
            }
            switch mode {
            case .live:
                var table: [String] = []
                for tracked in sessions {
                    let status = tracked.status(now: now)
                    for row in status.subflows where row.state == SubflowState.closed.rawValue {
                        let key = "\(tracked.id).\(row.id)"
                        if s.retiredAt[key] == nil { s.retiredAt[key] = now }
                    }
                    table += LiveViewRenderer.sessionLines(status) { row in
                        guard let at = s.retiredAt["\(tracked.id).\(row.id)"] else { return true }
                        return now - at < Self.retiredVisibility
                    }
                }
                if sessions.isEmpty, registry.command == "serve" {
                    table.append("waiting for sessions on port \(registry.port.map(String.init) ?? "?") as \(registry.localName)")
                }
                // Keep the table within the screen: rows that scrolled off could not be redrawn.
                if table.count > size.rows - 1 { table = Array(table.prefix(max(1, size.rows - 2))) + ["… \(table.count - size.rows + 2) more lines"] }
                if s.drawnHeight > 0 { output += "\u{1B}[\(s.drawnHeight)F" }
                output += "\u{1B}[J"
                if !s.cursorHidden, !final {
                    output += "\u{1B}[?25l"
                    s.cursorHidden = true
                }
                for line in permanent + table { output += LiveViewRenderer.fit(line, width: size.columns) + "\u{1B}[K\n" }
                s.drawnHeight = table.count
                if final {
                    output += "\u{1B}[?25h"
                    s.cursorHidden = false
                    s.drawnHeight = 0
                }
            case .lines:
                var lines = permanent
                if final || s.lastStatusLine.map({ now - $0 >= .seconds(1) }) ?? true {
                    s.lastStatusLine = now
                    // Nothing to say before the first sample.
                    lines += sessions.filter { $0.finished == nil && $0.sample != nil }.map { LiveViewRenderer.statusLine($0.status(now: now)) }
                }
                for line in lines { output += line + "\n" }
            case .auto, .off:
                break
            }
            // Under the lock: a frame written out of order would break the next one's cursor arithmetic.
            if !output.isEmpty { Terminal.write(output, to: self.output) }
        }
    }

}

enum Terminal {
    static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

    static func size(_ fd: Int32) -> (rows: Int, columns: Int) {
        var size = winsize()
        guard ioctl(fd, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0, size.ws_row > 0 else { return (24, 120) }
        return (Int(size.ws_row), Int(size.ws_col))
    }

    /// One write(2) per frame: a terminal never shows half a redraw.
    static func write(_ text: String, to fd: Int32 = STDOUT_FILENO) {
        fflush(nil)
        _ = Array(text.utf8).withUnsafeBytes { writeAll(fd, $0) }
    }

    /// Writes every byte, retrying interrupted and partial writes; the errno of a failure, else nil.
    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            offset += n
        }
        return nil
    }

    /// A live view hides the cursor; an interrupted run must give it back.
    static func restoreCursor() {
        if isTerminal(STDOUT_FILENO) { write("\u{1B}[?25h") }
    }
}
