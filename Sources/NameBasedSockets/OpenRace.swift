import Logging
import NIOCore

/// Staggered open attempts (Happy Eyeballs, RFC 8305, for pairs of addresses): `NBS.open` starts
/// the next pair's attempt when those in flight have not reached the peer within
/// `NBSOptions.openAttemptDelay`, and only one attempt at a time ever goes on to admission.
/// Racing whole handshakes would let two OPENs be admitted, each a session of its own in the
/// listener's application. Over TCP, OPEN leaves only on a connection already up and only on one
/// (`claim`), so the connects race and nothing else; a loser's connection carries the preamble
/// alone, which a listener drops. The exception is a Fast Open connect, whose OPEN rides in its SYN:
/// it claims at once, and a racer (which never uses Fast Open) that connects while that SYN is
/// still unanswered takes over from it. Over UDP the OPEN is the first datagram, so hellos race;
/// a UDP listener admits only on the opener's DATA_ACK, so the claim comes with ACCEPT and a loser
/// never sends one. Plain TCP opens (a peer known to be legacy) race their connects too, as RFC
/// 8305 describes: the first connection up is the session, and the others close unused.
final class OpenRace: @unchecked Sendable {
    // Touched on `loop` only; `@unchecked` for the cancellation handler that hops there.
    private let loop: any EventLoop
    private var attempts: [Int: any OpenRaceEntrant] = [:]
    private var claimant: Int?
    private var ended = false

    init(loop: any EventLoop) {
        self.loop = loop
    }

    /// An attempt that lost: it sent no OPEN (or its Fast Open SYN was never answered), so the
    /// listener has no session of it and its pair may be tried again.
    struct Superseded: Error {
        /// It had a connection: the pair works and is the best to try next.
        var connected: Bool
    }

    /// What a connected attempt may do, given the claimant's state.
    enum Claim: Equatable {
        case open
        /// The claimant's Fast Open SYN (its OPEN in it) is still unanswered: it gives way.
        case openReplacing(Int)
        case superseded
    }

    static func claim(claimant: (index: Int, synUnanswered: Bool)?) -> Claim {
        guard let claimant else { return .open }
        return claimant.synUnanswered ? .openReplacing(claimant.index) : .superseded
    }

    /// The race, the pair's index and the pair, and whether it races others (no Fast Open then).
    typealias Attempt = (OpenRace, Int, PathPlanner.Join, Bool) -> EventLoopFuture<Session>

    /// Runs `attempt` over `pairs` in order until one gives a session: one at a time, or, with
    /// `stagger`, the next beside those in flight when none has reached the peer within it. A peer
    /// that answers but refuses is final; one that cannot be reached is tried at the next pair.
    /// All of it runs on `loop`: the caller's task hops there and back once, as for one attempt.
    static func first(of pairs: [PathPlanner.Join], on loop: any EventLoop, stagger: TimeAmount?, peerName: String,
                      attempt: @escaping @Sendable Attempt) async throws -> Session {
        let race = OpenRace(loop: loop)
        let result = loop.flatSubmit {
            race.begin(pairs: pairs, stagger: stagger, peerName: peerName, attempt: attempt)
        }
        // A cancelled open closes its attempts at once rather than at their next timeout.
        return try await withTaskCancellationHandler {
            try await result.get()
        } onCancel: {
            loop.execute { race.finish(CancellationError()) }
        }
    }

    // The open's state, from `begin` on.
    private var pairs: [PathPlanner.Join] = []
    private var queue: [Int] = []
    private var stagger: TimeAmount?
    private var peerName = ""
    private var attempt: Attempt?
    private var running = 0
    private var started = 0
    private var failures: [String] = []
    /// A close without a byte in answer is what a legacy server does, but also what an NBS listener
    /// does to an OPEN that a blackhole or a full accept queue held past its `legacyDetectionDelay`:
    /// it is final only once no other address is left to try.
    private var closedUnanswered: NBSError?
    private var result: EventLoopPromise<Session>?

    private func begin(pairs: [PathPlanner.Join], stagger: TimeAmount?, peerName: String, attempt: @escaping Attempt) -> EventLoopFuture<Session> {
        loop.preconditionInEventLoop()
        (self.pairs, self.queue, self.stagger, self.peerName, self.attempt) = (pairs, Array(pairs.indices), stagger, peerName, attempt)
        let result = loop.makePromise(of: Session.self)
        self.result = result
        startNext()
        return result.futureResult
    }

    private func startNext() {
        guard !ended, let attempt, !queue.isEmpty else { return }
        let index = queue.removeFirst(), pair = pairs[index]
        let racing = running > 0
        if racing {
            Logger(label: "nbs.open").info("no answer yet over \(running) pair(s) to \(peerName): pair \(index + 1), \(pair.local.hostString) → \(pair.remote.hostString), starts beside")
        }
        running += 1
        started += 1
        attempt(self, index, pair, racing).assumeIsolated().whenComplete { [self] outcome in
            finished(index, outcome)
        }
        armStagger()
    }

    /// RFC 8305: the delay runs from the latest attempt's start; an earlier timer finds it moved on.
    private func armStagger() {
        guard let stagger, !queue.isEmpty else { return }
        let armedAt = started
        loop.assumeIsolated().scheduleTask(in: stagger) { [self] in
            guard !ended, armedAt == started, !queue.isEmpty else { return }
            claimantSynUnanswered().assumeIsolated().whenSuccess { [self] unanswered in
                // A claimant that reached the peer is left to finish: its failure starts the next.
                if claimant == nil || unanswered { startNext() }
            }
        }
    }

    private func finished(_ index: Int, _ outcome: Result<Session, any Error>) {
        running -= 1
        let pair = pairs[index]
        // A failure lets the next connected attempt open; a session (plain TCP included) keeps the
        // claim, so that no other OPEN follows it.
        if case .failure = outcome {
            attempts[index] = nil
            if claimant == index { claimant = nil }
        }
        switch outcome {
        case .success(let session):
            guard !ended else {
                // Only an open cancelled as its attempt completed gets here: nobody takes the session.
                session.engine.value.abort(reason: .applicationAbort, message: "the open was cancelled")
                return
            }
            end(keeping: index)
            result?.succeed(session)
        case .failure(let error as Superseded):
            guard !ended else { return }
            // Tried again after the others: first if its connection was up.
            if error.connected { queue.insert(index, at: 0) } else { queue.append(index) }
            if running == 0 { startNext() } else { armStagger() }
        case .failure(let error):
            guard !ended else { return }
            switch error {
            case let closed as OpenAttempt.ClosedUnanswered:
                closedUnanswered = closed.error
            case let error as NBSError:
                switch error {
                case .refused, .handshakeFailed, .protocolViolation, .verificationFailed, .legacyPeer:
                    return finish(error)
                default:
                    failures.append("\(pair.local.hostString) → \(pair.remote.hostString): \(error)")
                }
            default:
                failures.append("\(pair.local.hostString) → \(pair.remote.hostString): \(readableSocketError(error))")
            }
            if !queue.isEmpty {
                startNext()
            } else if running == 0 {
                // Another address answered nothing at all: the one that closed is the better account.
                finish(closedUnanswered ?? NBSError.connectFailed(peer: peerName, reason: failures.joined(separator: "; ")))
            }
        }
    }

    /// The open fails (or was cancelled): every attempt closes.
    fileprivate func finish(_ error: any Error) {
        loop.preconditionInEventLoop()
        guard !ended else { return }
        end(keeping: nil)
        result?.fail(error)
    }

    func register(_ index: Int, _ attempt: any OpenRaceEntrant) {
        loop.preconditionInEventLoop()
        attempts[index] = attempt
        if ended { attempt.abandon(Superseded(connected: false)) }
    }

    /// Called by a connected attempt before it writes OPEN; fails with `Superseded` if it must not.
    func claim(_ index: Int) -> EventLoopFuture<Void> {
        loop.preconditionInEventLoop()
        guard !ended else { return loop.makeFailedFuture(Superseded(connected: true)) }
        return claimantSynUnanswered().flatMapThrowing { [self] unanswered in
            guard !ended else { throw Superseded(connected: true) }
            switch Self.claim(claimant: claimant.map { ($0, unanswered) }) {
            case .open:
                claimant = index
            case .openReplacing(let previous):
                Logger(label: "nbs.open").info("the Fast Open SYN of open pair \(previous + 1) is still unanswered: pair \(index + 1), connected, takes over")
                attempts[previous]?.abandon(Superseded(connected: false))
                claimant = index
            case .superseded:
                throw Superseded(connected: true)
            }
        }
    }

    /// One attempt won, or the open failed: every other attempt closes, sending nothing more.
    private func end(keeping winner: Int?) {
        ended = true
        for (index, attempt) in attempts where index != winner {
            attempt.abandon(Superseded(connected: false))
        }
        // The winner's attempt holds its subflow; nothing here needs it any more.
        (attempts, attempt) = ([:], nil)
    }

    /// A Fast Open claimant's SYN carried its OPEN; until the kernel has the SYN-ACK, the listener
    /// may never have seen either. A plain connect that completed has had its answer.
    private func claimantSynUnanswered() -> EventLoopFuture<Bool> {
        guard let claimant, let attempt = attempts[claimant] as? OpenAttempt, attempt.connectDeferred,
            let provider = attempt.channel as? any SocketOptionProvider
        else { return loop.makeSucceededFuture(false) }
        return provider.getKernelTCPInfo().map { $0.state == KernelTCPInfo.synSent }.recover { _ in false }
    }
}

/// An attempt the race can close, when another wins or the open ends.
protocol OpenRaceEntrant: AnyObject {
    func abandon(_ error: any Error)
}

/// A plain TCP connect in a race: nothing is sent on it before it wins, so closing it is all.
final class PlainConnectAttempt: OpenRaceEntrant {
    var channel: (any Channel)?
    private(set) var abandoned = false

    func abandon(_ error: any Error) {
        abandoned = true
        channel?.close(promise: nil)
    }
}
