import { Widget } from '@lumino/widgets';

import { formatCredits } from './format';
import { TwargaModel } from './model';

/** "Credits: 1000" in the status bar; clicking it opens the Twarga Lab panel. */
export class CreditsStatus extends Widget {
  constructor(options: CreditsStatus.IOptions) {
    super();
    this._model = options.model;
    this.addClass('twarga-statusbar-credits');
    this.addClass('jp-StatusBar-TextItem');
    this.node.title = 'Twarga Lab credits: click to open the panel';
    this.node.addEventListener('click', options.onClick);
    this._model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const me = this._model.me;
    if (this._model.serviceError) {
      this.node.textContent = me
        ? `Credits: ${formatCredits(me.credits)} (offline)`
        : 'Twarga: offline';
      this.node.dataset.service = 'down';
    } else {
      this.node.textContent = me
        ? `Credits: ${formatCredits(me.credits)}`
        : 'Credits: …';
      this.node.dataset.service = me ? 'up' : 'loading';
    }
  }

  private _model: TwargaModel;
}

export namespace CreditsStatus {
  export interface IOptions {
    model: TwargaModel;
    onClick: () => void;
  }
}
